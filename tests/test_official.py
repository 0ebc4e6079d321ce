"""official.from_official: loading the released code's UNITE weights
(ShivamDuggal4/UNITE-tokenization-generation).
The state dicts here are built from our model with the released key names written out by hand from
its models/unite.py, modules/encoder.py and modules/decoder.py (not from official._TO_OFFICIAL).
Run: python -m pytest tests/test_official.py -q"""
import pytest
import torch

from data import UserError
from model import UNITE, make_config
from official import from_official


def random_model(seed=0):
    """micro UNITE with every tensor random (zero-init layers too, so a mix-up cannot hide)."""
    torch.manual_seed(seed)
    m = UNITE(make_config("micro", num_classes=5))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        m.encoder.t_embed.W.copy_(torch.randn_like(m.encoder.t_embed.W))
    return m


def official_state_dict(m):
    """The released UNITE's state dict holding m's weights, with its fixed and untrained tensors."""
    e, d, D = m.encoder, m.decoder, m.cfg.enc_width
    sd = {"latent_tokens": e.latent_pos,
          "patch_embed.patch_embeddings.projection.weight": e.patch_embed.weight,
          "patch_embed.patch_embeddings.projection.bias": e.patch_embed.bias,
          # never initialised
          "patch_embed.position_embeddings": torch.zeros(1, m.cfg.grid ** 2 + 1, D),
          "encoder.up_sample.weight": e.latent_in.weight,
          "encoder.up_sample.bias": e.latent_in.bias,
          "encoder.t_embedder.W": e.t_embed.W,
          "encoder.t_embedder.mlp.0.weight": e.t_embed.mlp[0].weight,
          "encoder.t_embedder.mlp.0.bias": e.t_embed.mlp[0].bias,
          "encoder.t_embedder.mlp.2.weight": e.t_embed.mlp[2].weight,
          "encoder.t_embedder.mlp.2.bias": e.t_embed.mlp[2].bias,
          "encoder.t_embedder.special_time_emb": torch.randn(D),                       # never read
          "encoder.y_embedder.embedding_table.weight": torch.cat([e.y_embed.weight,
                                                                  torch.randn(1, D)]),
          "encoder.pos_embed": torch.randn(1, 256, D),                                 # never read
          "encoder.feat_rope.freqs_cos": e.rope_cos, "encoder.feat_rope.freqs_sin": e.rope_sin,
          "encoder.feat_rope_incontext.freqs_cos": e.rope_ic_cos,
          "encoder.feat_rope_incontext.freqs_sin": e.rope_ic_sin,
          "encoder.in_context_posemb": e.in_context_pos,
          "encoder.final_layer.norm_final.weight": e.final_norm.weight,
          "encoder.final_layer.linear.weight": e.final_linear.weight,
          "encoder.final_layer.linear.bias": e.final_linear.bias,
          "encoder.final_layer.adaLN_modulation.1.weight": e.final_adaLN[1].weight,
          "encoder.final_layer.adaLN_modulation.1.bias": e.final_adaLN[1].bias,
          "encoder_layer_norm.weight": e.out_norm.weight,
          "encoder_layer_norm.bias": e.out_norm.bias,
          "up_sample_decoder.weight": d.embed[0].weight, "up_sample_decoder.bias": d.embed[0].bias,
          "decoder.decoder_embed.weight": d.embed[1].weight,
          "decoder.decoder_embed.bias": d.embed[1].bias,
          "decoder.decoder_pos_embed": d.pos,
          "decoder.decoder_norm.weight": d.norm.weight, "decoder.decoder_norm.bias": d.norm.bias,
          "decoder.decoder_pred.weight": d.head.weight, "decoder.decoder_pred.bias": d.head.bias,
          "decoder.trainable_cls_token": d.cls.reshape(-1),
          # a few of the frozen LPIPS net's tensors
          "lpips_loss.scaling_layer.shift": torch.randn(1, 3, 1, 1),
          "lpips_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3),
          "lpips_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1)}
    for i, b in enumerate(e.blocks):
        p = f"encoder.blocks.{i}."
        for name in ("norm1.weight", "norm2.weight", "norm3.weight", "attn.q_norm.weight",
                     "attn.k_norm.weight"):
            sd[p + name] = b.get_parameter(name)
        for mod in ("attn.qkv", "attn.proj", "mlp.w12", "mlp.w3"):
            for wb in ("weight", "bias"):
                sd[f"{p}{mod}.{wb}"] = b.get_parameter(f"{mod}.{wb}")
        sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"] = (b.adaLN[1].weight,
                                                                                  b.adaLN[1].bias)
    theirs = dict(layernorm_before="norm1", qkv="attn.qkv", attn_proj="attn.proj",
                  layernorm_after="norm2", ffn_up="mlp.fc1", ffn_down="mlp.fc2")
    for i, b in enumerate(d.blocks):
        for name, ours in theirs.items():
            for wb in ("weight", "bias"):
                sd[f"decoder.decoder_layers.{i}.{name}.{wb}"] = b.get_parameter(f"{ours}.{wb}")
    return {k: v.detach().clone() for k, v in sd.items()}


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def compiled(sd):
    """Keys as the released trainer saves them: its decoder is torch.compile-d."""
    return {("decoder._orig_mod." + k[len("decoder."):] if k.startswith("decoder.") else k): v
            for k, v in sd.items()}


def test_round_trip_is_exact():
    m = random_model()
    back = from_official(official_state_dict(m), m.cfg)
    assert_same_weights(back, m)
    m.eval(), back.eval()
    z, t, y = (torch.randn(3, m.cfg.num_tokens, m.cfg.latent_dim), torch.rand(3),
               torch.tensor([0, 4, 5]))
    assert torch.equal(back.encoder.denoise(z, t, y), m.encoder.denoise(z, t, y))


def test_label_table_drops_the_unused_last_row():
    m = random_model()
    sd = official_state_dict(m)
    table = sd["encoder.y_embedder.embedding_table.weight"]
    assert table.shape == (m.cfg.num_classes + 2, m.cfg.enc_width)  # classes, null, one unused row
    # the unused row: must not be read
    table[-1] = 1e6
    back = from_official(sd, m.cfg)
    assert torch.equal(back.encoder.y_embed.weight, table[:-1])      # null = row num_classes, kept


def test_checkpoint_file_and_prefixes():
    ema, raw = random_model(1), random_model(2)
    cfg = ema.cfg
    file = {"step": 100, "epoch": 1, "model": compiled(official_state_dict(raw)),
            "ema": compiled(official_state_dict(ema)), "current_best_cfg_scale": 3.4,
            "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 100}}
    assert_same_weights(from_official(file, cfg), ema)                # the EMA is preferred
    del file["ema"]
    assert_same_weights(from_official(file, cfg), raw)                # else the raw weights
    ddp = {"module." + k: v for k, v in official_state_dict(ema).items()}
    assert_same_weights(from_official(ddp, cfg), ema)


def test_skipped_tensors_are_not_needed():
    m = random_model()
    sd = official_state_dict(m)
    for k in ("encoder.pos_embed", "encoder.t_embedder.special_time_emb",
              "lpips_loss.net.slice1.0.weight"):
        sd[k] = torch.randn_like(sd[k]) * 100                       # any content: never read
    # their EMA also averages the frozen decoder_pos_embed: float32 drift of ~3e-6 is accepted
    pos = sd["decoder.decoder_pos_embed"]
    sd["decoder.decoder_pos_embed"] = pos + 3e-6 * torch.randn(pos.shape)
    assert_same_weights(from_official(sd, m.cfg), m)
    skip = ("lpips_loss.", "encoder.pos_embed", "encoder.t_embedder.special_time_emb",
            "patch_embed.position_embeddings", "encoder.feat_rope", "decoder.decoder_pos_embed")
    assert_same_weights(from_official({k: v for k, v in sd.items() if not k.startswith(skip)},
                                      m.cfg), m)


@pytest.mark.parametrize("key, match", [
    ("patch_embed.position_embeddings", "patch_embed.position_embeddings is not zero"),
    ("encoder.feat_rope_incontext.freqs_sin",
     "encoder.feat_rope_incontext.freqs_sin in the file differs"),
    ("decoder.decoder_pos_embed", "decoder.decoder_pos_embed in the file differs"),
])
def test_fixed_tables_are_checked(key, match):
    m = random_model()
    sd = official_state_dict(m)
    sd[key] = sd[key] + 0.01
    with pytest.raises(UserError, match=match):
        from_official(sd, m.cfg)


def one_line_error(sd, cfg, **kw):
    with pytest.raises(UserError) as e:
        from_official(sd, cfg, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unknown_missing_and_wrong_shape_name_the_tensor():
    m = random_model()
    sd = official_state_dict(m)
    extra = dict(sd, **{"encoder.blocks.0.attn.extra_gate": torch.zeros(3)})
    assert "encoder.blocks.0.attn.extra_gate" in one_line_error(extra, m.cfg)
    missing = {k: v for k, v in sd.items() if k != "encoder.blocks.1.mlp.w3.weight"}
    assert "encoder.blocks.1.mlp.w3.weight" in one_line_error(missing, m.cfg)
    bad = dict(sd, **{"encoder.final_layer.linear.weight": torch.zeros(7, m.cfg.enc_width)})
    msg = one_line_error(bad, m.cfg)
    assert "encoder.final_layer.linear.weight" in msg and "(7, 64)" in msg and "(8, 64)" in msg
    cfg_sep = make_config("micro", num_classes=5, separate=True)
    assert "separate" in one_line_error(sd, cfg_sep)


def test_wrong_preset_names_preset_and_tensor():
    sd = official_state_dict(random_model())
    deeper = make_config("micro", num_classes=5, enc_depth=3)
    msg = one_line_error(sd, deeper, preset="deep")
    assert "--model deep" in msg and "encoder.blocks." in msg and "3" in msg and "2" in msg
    wider = make_config("micro", num_classes=5, enc_width=96)
    msg = one_line_error(sd, wider, preset="wide")
    assert "--model wide" in msg and "latent_tokens" in msg and "64)" in msg and "96)" in msg
    classes = make_config("micro", num_classes=7)
    msg = one_line_error(sd, classes, preset="C7")
    assert ("encoder.y_embedder.embedding_table.weight" in msg and "(7, 64)" in msg
            and "(9, 64)" in msg)
