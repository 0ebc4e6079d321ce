"""
The authors' released UNITE checkpoints (ShivamDuggal4/UNITE-tokenization-generation,
models/unite.py) as our `UNITE`: `from_official(state_dict, cfg, preset)`. Our modules are theirs
tensor for tensor, under other names; sample.py uses this for `python sample.py UNITE-B.pt`.
"""
import re

from data import UserError
from model import UNITE, UniteConfig

# our state-dict names -> theirs. First matching rule wins; other names are equal.
_TO_OFFICIAL = [  # (our state-dict name, released name)
    (r"^encoder\.latent_pos$", "latent_tokens"),
    (r"^encoder\.patch_embed\.", "patch_embed.patch_embeddings.projection."),
    (r"^encoder\.out_norm\.", "encoder_layer_norm."),
    (r"^encoder\.latent_in\.", "encoder.up_sample."),
    (r"^encoder\.t_embed\.", "encoder.t_embedder."),             # incl. the fixed frequencies W
    (r"^encoder\.y_embed\.", "encoder.y_embedder.embedding_table."),
    (r"^encoder\.in_context_pos$", "encoder.in_context_posemb"),
    (r"^encoder\.final_norm\.", "encoder.final_layer.norm_final."),
    (r"^encoder\.final_adaLN\.", "encoder.final_layer.adaLN_modulation."),
    (r"^encoder\.final_linear\.", "encoder.final_layer.linear."),
    (r"^(encoder\.blocks\.\d+)\.adaLN\.", r"\1.adaLN_modulation."),
    (r"^decoder\.embed\.0\.", "up_sample_decoder."),
    (r"^decoder\.embed\.1\.", "decoder.decoder_embed."),
    (r"^decoder\.cls$", "decoder.trainable_cls_token"),
    (r"^decoder\.norm\.", "decoder.decoder_norm."),
    (r"^decoder\.head\.", "decoder.decoder_pred."),
    (r"^decoder\.blocks\.(\d+)\.norm1\.", r"decoder.decoder_layers.\1.layernorm_before."),
    (r"^decoder\.blocks\.(\d+)\.norm2\.", r"decoder.decoder_layers.\1.layernorm_after."),
    (r"^decoder\.blocks\.(\d+)\.attn\.qkv\.", r"decoder.decoder_layers.\1.qkv."),
    (r"^decoder\.blocks\.(\d+)\.attn\.proj\.", r"decoder.decoder_layers.\1.attn_proj."),
    (r"^decoder\.blocks\.(\d+)\.mlp\.fc1\.", r"decoder.decoder_layers.\1.ffn_up."),
    (r"^decoder\.blocks\.(\d+)\.mlp\.fc2\.", r"decoder.decoder_layers.\1.ffn_down."),
]
# released tensors with no trained content, skipped by name: the frozen LPIPS net, two tables their
# forward never reads, and fixed tables that from_official checks against ours
_OFFICIAL_SKIP = (r"^lpips_loss\.", r"^encoder\.pos_embed$",
                  r"^encoder\.t_embedder\.special_time_emb$", r"^patch_embed\.position_embeddings$",
                  r"^decoder\.decoder_pos_embed$",
                  r"^encoder\.feat_rope(_incontext)?\.freqs_(cos|sin)$")


def _official_name(key):
    for pattern, repl in _TO_OFFICIAL:
        name, n = re.subn(pattern, repl, key)
        if n:
            return name
    return key


def from_official(state_dict, cfg: UniteConfig, preset=None):
    """UNITE(cfg) carrying the weights of the released code's `UNITE` (its models/unite.py).

    state_dict: a plain state dict of theirs, or their checkpoint file's dict (utils/checkpoint.py:
    step, epoch, model, ema, current_best_cfg_scale, optimizer(_muon), scheduler(_muon); no config),
    of which "ema" is used (else "model"). The `_orig_mod.` of torch.compile (their decoder is
    compiled, so its keys carry it) and a leading `module.` are stripped. Names, theirs -> ours
    (rules in _TO_OFFICIAL):
      latent_tokens -> encoder.latent_pos
      patch_embed.patch_embeddings.projection -> encoder.patch_embed
      encoder.{up_sample, t_embedder, y_embedder.embedding_table, in_context_posemb}
          -> encoder.{latent_in, t_embed, y_embed, in_context_pos}
      encoder.final_layer.{norm_final, adaLN_modulation, linear}
          -> encoder.final_{norm, adaLN, linear}
      encoder.blocks.i.adaLN_modulation -> encoder.blocks.i.adaLN (the rest of a block: same names)
      encoder_layer_norm -> encoder.out_norm
      up_sample_decoder, decoder.decoder_embed -> decoder.embed.0, decoder.embed.1 (C -> 768 -> D)
      decoder.trainable_cls_token (D,) -> decoder.cls (1, 1, D)
      decoder.decoder_layers.i.{layernorm_before, qkv, attn_proj, layernorm_after, ffn_up, ffn_down}
          -> decoder.blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}
      decoder.decoder_norm, decoder.decoder_pred -> decoder.norm, decoder.head
    Their label table has num_classes + 2 rows (LabelEmbedder: the classes, null = num_classes, and
    a last row its comment calls "not required", which no label reaches): the last row is dropped.
    Skipped by name (_OFFICIAL_SKIP): lpips_loss.*, encoder.pos_embed and special_time_emb (never
    read); patch_embed.position_embeddings must be zero (its init is never called); the RoPE tables
    and decoder_pos_embed must equal the ones we compute. Any other leftover or missing tensor, or a
    shape that does not fit cfg, is a one-line UserError naming the tensor (and `preset`, e.g. "B").
    The file cannot tell the decoder's head count or in_context_start: those come from cfg."""
    sd = state_dict
    for entry in ("ema", "model"):  # their file: the EMA weights, which all their evaluations use
        if isinstance(state_dict.get(entry), dict):
            sd = state_dict[entry]
            break
    sd = {re.sub(r"^module\.", "", k).replace("_orig_mod.", ""): v for k, v in sd.items()}
    what = f"--model {preset}" if preset else "the model config"
    if cfg.separate:
        raise UserError("the released UNITE shares one GE for both passes: cfg.separate is set")
    depths = (("encoder.blocks.", cfg.enc_depth), ("decoder.decoder_layers.", cfg.dec_depth))
    for prefix, n_ours in depths:  # a wrong preset usually shows here first
        idx = [int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)]
        n = 1 + max(idx, default=-1)
        if n != n_ours:
            raise UserError(f"{what} has {n_ours} {prefix}* layers but the file has {n}")
    model = UNITE(cfg)
    ours, weights = model.state_dict(), {}
    names = {_official_name(k): k for k in ours}                                 # released -> ours
    for name, v in sd.items():
        if any(re.search(p, name) for p in _OFFICIAL_SKIP):
            continue
        if name not in names:
            raise UserError(f"the file has a tensor {name} that {what} has no place for")
        k = names[name]
        want = tuple(ours[k].shape)
        if k == "encoder.y_embed.weight":
            want = (want[0] + 1, want[1])                                  # + their unused last row
        elif k == "decoder.cls":
            want = want[-1:]                                               # (D,) in theirs
        if tuple(v.shape) != want:
            raise UserError(f"{name} is {tuple(v.shape)} in the file but {want} for {what}")
        weights[k] = v[:-1] if k == "encoder.y_embed.weight" else v.reshape(ours[k].shape)
    missing = [name for name, k in names.items() if k not in weights]
    if missing:
        raise UserError(f"the file has no tensor {missing[0]} (needed by {what})")
    pe = sd.get("patch_embed.position_embeddings")
    if pe is not None and pe.abs().max() > 0:
        raise UserError("patch_embed.position_embeddings is not zero in the file (ours has none)")
    enc = model.encoder
    fixed = {"encoder.feat_rope.freqs_cos": enc.rope_cos,
             "encoder.feat_rope.freqs_sin": enc.rope_sin,
             "encoder.feat_rope_incontext.freqs_cos": enc.rope_ic_cos,
             "encoder.feat_rope_incontext.freqs_sin": enc.rope_ic_sin,
             "decoder.decoder_pos_embed": model.decoder.pos}
    # tolerance 1e-4: their EMA also averages the frozen decoder_pos_embed (a requires_grad=False
    # parameter), which moves it by ~3e-6 in float32; a table of another shape or grid is off
    # by O(1)
    for name, table in fixed.items():
        v = sd.get(name)
        if v is not None and (v.shape != table.shape or (v.float() - table).abs().max() > 1e-4):
            raise UserError(f"{name} in the file differs from the table we compute for {what}")
    model.load_state_dict(weights)
    return model

