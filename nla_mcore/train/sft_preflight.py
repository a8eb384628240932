"""Checks of an SFT config against its files, run by the CLI before any rank starts.

Seconds, not minutes: the model source is identified, the training file's sidecar is read and
compared with the model's config (stage, width, layer), and the layout is checked for the
number of ranks the CLI is about to launch.  The ranks check everything again, row by row.
"""

from __future__ import annotations

from nla_mcore.data.sft_files import DataError


def preflight(cfg, role: str) -> None:
    from nla_mcore.launchers.local import under_launcher
    from nla_mcore.models.hf_config import load_hf_config
    from nla_mcore.runtime.parallel import validate_layout
    from nla_mcore.sidecar import read_dataset_sidecar
    from nla_mcore.train.sft_config import require_run_fields
    from nla_mcore.train.sources import resolve_source

    require_run_fields(cfg)
    source = resolve_source(cfg.model.source, role)
    hf = load_hf_config(source.hf_dir)
    stage = "ar_sft" if role == "ar" else "av_sft"
    sidecar = read_dataset_sidecar(cfg.data.train_file)
    if sidecar.stage != stage:
        raise DataError(
            f"data.train_file={cfg.data.train_file} is a {sidecar.stage} file; "
            f"sft-{role} trains on {stage}"
        )
    if sidecar.extraction.d_model != hf.hidden_size:
        raise DataError(
            f"data.train_file={cfg.data.train_file} holds vectors of d={sidecar.extraction.d_model}"
            f", the model {source.path} has hidden_size={hf.hidden_size}: the data and the model "
            "must come from the same base model"
        )
    layer = sidecar.extraction.layer_index
    if not 0 <= layer < hf.num_layers:
        raise DataError(
            f"data.train_file={cfg.data.train_file} was extracted at layer K={layer}, but "
            f"{source.path} has {hf.num_layers} layers"
        )
    if cfg.model.extraction_layer is not None and cfg.model.extraction_layer != layer:
        raise DataError(
            f"model.extraction_layer={cfg.model.extraction_layer}, but the data was extracted at "
            f"layer {layer}"
        )
    if not under_launcher():
        validate_layout(
            cfg.parallel,
            world_size=cfg.nproc,
            num_attention_heads=hf.num_attention_heads,
            num_query_groups=hf.num_key_value_heads,
            num_layers=cfg.parallel.pipeline_parallel,
            vocab_size=hf.vocab_size,
        )
