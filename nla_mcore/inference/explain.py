"""`nla-mcore explain`: explain the vectors of a parquet with an AV, score them with an AR, and
write a transcript a researcher can read.

    nla-mcore explain --av runs/av/hf --ar runs/ar/hf --parquet data/rl.parquet --rows 0:50
        -> explain_rl.md (readable) and explain_rl.jsonl (one record per row)

The parquet needs an `activation_vector` column (datagen's activation, av_sft, ar_sft and rl
files all have one); `detokenized_text_truncated` (the text up to the vector's token),
`doc_id` and the reference explanation (`explanation` of explained splits, or the parsed
`response` of av_sft) are shown when present.
Vectors are checked (width, finite, non-zero) before any model runs.  Unparseable or truncated
explanations are listed and counted; FVE (against the `rawvar` baseline over the rows scored,
see `eval.scores`) is computed over the parseable ones.  Where the file has reference
explanations, the AR scores them too: the AV's explanations are best read against that.  Both outputs are written to temporary
files and renamed, so an interrupted run leaves no half transcript.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT_SHOWN = 600  # characters of the context shown per row in the Markdown (the end of it)


@dataclass
class Row:
    index: int
    vector: np.ndarray
    doc_id: str | None = None
    text: str | None = None
    reference: str | None = None


def parse_rows(spec: str, total: int) -> list[int]:
    """'all', 'a:b' (Python slice) or '3,5,9' -> row indices (checked against `total`)."""
    if spec == "all":
        return list(range(total))
    try:
        if ":" in spec:
            start, _, stop = spec.partition(":")
            first, end = int(start or 0), int(stop) if stop else total
            if not 0 <= first < end <= total:
                raise ValueError(f"--rows {spec}: the file has {total} rows (0:{total})")
            return list(range(first, end))
        rows = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as err:
        if "--rows" in str(err):
            raise
        raise ValueError(f"--rows {spec!r}: expected all, a:b or 3,5,9") from None
    bad = [r for r in rows if not 0 <= r < total]
    if bad:
        raise ValueError(f"--rows {spec}: rows {bad[:5]} are outside the file's {total} rows")
    if not rows:
        raise ValueError(f"--rows {spec} selects no row of the file's {total} rows")
    return rows


def read_rows(path: Path, spec: str, d_model: int) -> list[Row]:
    """The selected rows, their vectors checked; only the columns shown are read."""
    import pyarrow.dataset as ds

    from nla_mcore.datagen.parquet_io import TEXT_COLUMN, VECTOR_COLUMN, open_parquet, vectors_ND
    from nla_mcore.prompts import parse_explanation

    file = open_parquet(path, "parquet")
    schema = file.schema_arrow
    if VECTOR_COLUMN not in schema.names:
        raise ValueError(
            f"{path} has no {VECTOR_COLUMN!r} column (it has: {', '.join(schema.names)})"
        )
    shown = [c for c in ("doc_id", TEXT_COLUMN, "explanation", "response") if c in schema.names]
    total = file.metadata.num_rows
    rows = parse_rows(spec, total)
    picked = ds.dataset(path, format="parquet").take(rows, columns=[VECTOR_COLUMN, *shown])
    vectors = vectors_ND(picked.column(VECTOR_COLUMN), d_model, str(path))
    for i, v in zip(rows, vectors, strict=True):
        if not np.isfinite(v).all() or not np.linalg.norm(v) > 0:
            raise ValueError(f"{path}: row {i}: the activation vector is NaN/inf or all zeros")
    columns = {name: picked.column(name).to_pylist() for name in shown}

    def column(name: str, k: int):
        return columns[name][k] if name in columns else None

    def reference(k: int) -> str | None:  # explained splits: explanation; av_sft: the target
        if "explanation" in columns:
            return column("explanation", k)
        response = column("response", k)
        return None if response is None else parse_explanation(response)

    return [
        Row(
            index=i,
            vector=vectors[k],
            doc_id=column("doc_id", k),
            text=column(TEXT_COLUMN, k),
            reference=reference(k),
        )
        for k, i in enumerate(rows)
    ]


def explain_rows(client, critic, rows: list[Row], args) -> tuple[list[dict], dict]:
    """(one record per row, the summary): explanations, and scores when there is an AR."""
    from tqdm import tqdm

    vectors_ND = np.stack([r.vector for r in rows])
    with tqdm(total=len(rows), desc="explain", unit="vector", disable=args.quiet) as bar:
        explanations = client.explain(
            vectors_ND,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            batch_size=args.batch_size,
            on_batch=bar.update,
        )
    records = [
        dict(
            row=r.index,
            doc_id=r.doc_id,
            text=r.text,
            reference=r.reference,
            explanation=e.text,
            response=e.response,
            finished=e.finished,
            tokens=e.num_tokens,
            cos=None,
            mse_nrm=None,
        )
        for r, e in zip(rows, explanations, strict=True)
    ]
    parsed = [k for k, e in enumerate(explanations) if e.text is not None]
    stats = dict(
        rows=len(records), parsed=len(parsed), truncated=sum(not e.finished for e in explanations)
    )
    if critic is not None and parsed:
        scores = critic.score(
            [explanations[k].text for k in parsed], vectors_ND[parsed], batch_size=args.batch_size
        )
        for j, k in enumerate(parsed):
            records[k]["cos"] = float(scores.cos_N[j])
            records[k]["mse_nrm"] = float(scores.mse_nrm_N[j])
        stats.update(
            mean_cos=float(scores.cos_N.mean()),
            mean_mse_nrm=float(scores.mse_nrm_N.mean()),
            fve=scores.fve,
            fve_baseline=scores.baseline,
        )
    referenced = [k for k, r in enumerate(rows) if r.reference]
    if critic is not None and referenced:  # the AR on the explainer's text: what to compare with
        scores = critic.score(
            [rows[k].reference for k in referenced],
            vectors_ND[referenced],
            batch_size=args.batch_size,
        )
        for j, k in enumerate(referenced):
            records[k]["reference_cos"] = float(scores.cos_N[j])
        stats.update(
            reference_rows=len(referenced),
            reference_mean_cos=float(scores.cos_N.mean()),
            reference_fve=scores.fve,
        )
    return records, stats


def markdown(records: list[dict], stats: dict, header: dict) -> str:
    lines = [f"# NLA transcript: {header['parquet']}", ""]
    lines += [
        f"- **AV:** `{header['av']}` ({header['av_info']})",
        f"- **AR:** `{header['ar']}`" if header["ar"] else "- **AR:** none (no scores)",
        f"- **Rows:** {header['rows']}; decoding: {header['decoding']}",
        f"- **Summary:** {summary_line(stats)}",
        "",
    ]
    for r in records:
        title = f"## Row {r['row']}" + (f" (doc_id `{r['doc_id']}`)" if r["doc_id"] else "")
        lines += [title, ""]
        if r["text"]:
            shown = r["text"][-TEXT_SHOWN:]
            prefix = "…" if len(r["text"]) > TEXT_SHOWN else ""
            lines += [
                "Context (ending at the vector's token):",
                "",
                "> " + (prefix + shown).replace("\n", "\n> "),
                "",
            ]
        if r["explanation"] is not None:
            lines += [f"**Explanation:** {r['explanation']}", ""]
        else:
            why = "truncated at the token limit" if not r["finished"] else "no <explanation> tags"
            lines += [f"**Unparseable** ({why}): `{r['response'][:300]}`", ""]
        if r["reference"]:
            scored = f" (cos {r['reference_cos']:.3f})" if "reference_cos" in r else ""
            lines += [f"*Reference explanation{scored}:* {r['reference']}", ""]
        if r["mse_nrm"] is not None:
            lines += [f"cos {r['cos']:.3f} · mse_nrm {r['mse_nrm']:.3f}", ""]
    return "\n".join(lines) + "\n"


def summary_line(stats: dict) -> str:
    parts = [f"{stats['parsed']} of {stats['rows']} explanations parsed"]
    if stats["truncated"]:
        parts.append(f"{stats['truncated']} truncated")
    if "mean_cos" in stats:
        parts.append(f"mean cos {stats['mean_cos']:.3f}, mean mse_nrm {stats['mean_mse_nrm']:.3f}")
    if "fve" in stats:
        parts.append(
            f"FVE {stats['fve']:.3f} ({stats['fve_baseline']} baseline over the "
            f"{stats['parsed']} scored rows)"
        )
    if "reference_fve" in stats:
        parts.append(
            f"the reference explanations: mean cos {stats['reference_mean_cos']:.3f}, "
            f"FVE {stats['reference_fve']:.3f}"
        )
    return "; ".join(parts)


def check_same_world(parquet: Path, client, critic) -> None:
    """The vectors, the AV and the AR come from the same model, layer and width, where their
    sidecars say so (explaining layer-20 vectors with a layer-12 AV gives fluent nonsense)."""
    from nla_mcore.sidecar import dataset_sidecar_path, read_dataset_sidecar

    facts = {f"AV {client.dir.path}": _model_facts(client.dir.sidecar)}
    if critic is not None:
        facts[f"AR {critic.dir.path}"] = _model_facts(critic.dir.sidecar)
    if dataset_sidecar_path(parquet).is_file():
        extraction = read_dataset_sidecar(parquet).extraction
        facts[f"parquet {parquet}"] = dict(
            d_model=extraction.d_model,
            layer=extraction.layer_index,
            base_model=extraction.base_model,
        )
    for key in ("d_model", "layer", "base_model"):
        values = {who: f[key] for who, f in facts.items() if f.get(key) not in (None, "")}
        compared = values
        if key == "base_model":  # a local path and a hub id of one model share the last part
            compared = {who: Path(str(name)).name.lower() for who, name in values.items()}
        if len(set(compared.values())) > 1:
            said = "; ".join(f"{who}: {value}" for who, value in values.items())
            if key != "base_model":
                raise ValueError(f"the inputs disagree on the {key}: {said}")
            # names, not facts: a local path and a hub id can be the same model
            print(
                f"[explain] warning: the inputs name different base models: {said}", file=sys.stderr
            )


def _model_facts(sidecar) -> dict:
    return dict(
        d_model=sidecar.d_model,
        layer=sidecar.extraction_layer_index,
        base_model=sidecar.base_checkpoint,
    )


def parser() -> argparse.ArgumentParser:
    class Formatter(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):  # the default, where there is one to show
            shown = not any(action.default is x for x in (None, False, argparse.SUPPRESS))
            return f"{action.help} (default: %(default)s)" if shown else action.help

    p = argparse.ArgumentParser(
        prog="nla-mcore explain",
        formatter_class=Formatter,
        description="Explain the activation vectors of a parquet with an exported AV; with an "
        "AR, score each explanation (cos, mse_nrm) and the set (FVE).  Writes a Markdown "
        "transcript and a JSONL file.",
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--av", required=True, help="exported AV directory (ours or the released one)")
    p.add_argument("--ar", help="exported AR directory: adds cos, mse_nrm and FVE")
    p.add_argument("--parquet", required=True, help="a parquet with activation_vector")
    p.add_argument("--rows", default="0:64", help="all, a:b, or 3,5,9")
    p.add_argument("--out", help="output prefix (default: ./explain_<parquet stem>)")
    p.add_argument("--batch-size", type=int, default=16, help="vectors generated together")
    p.add_argument("--max-new-tokens", type=int, default=150, help="NLA.md's RL response cap")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--seed", type=int, default=None, help="seeds sampling")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one) | cuda | cpu")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on GPUs, else fp32) | float32 | bfloat16 | float16",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from nla_mcore.datagen.parquet_io import write_text_atomically
    from nla_mcore.inference.client import NLAClient
    from nla_mcore.inference.critic import NLACritic
    from nla_mcore.sidecar import read_model_sidecar

    args = parser().parse_args(argv)
    started = time.monotonic()
    try:
        av_sidecar = read_model_sidecar(args.av) if Path(args.av).is_dir() else None
        if av_sidecar is not None:  # the cheap checks first: a bad row fails in a second
            rows = read_rows(Path(args.parquet), args.rows, av_sidecar.d_model)
        client = NLAClient(args.av, device=args.device, dtype=args.dtype)
        critic = NLACritic(args.ar, device=args.device, dtype=args.dtype) if args.ar else None
        if av_sidecar is None:
            rows = read_rows(Path(args.parquet), args.rows, client.dir.hf.hidden_size)
        check_same_world(Path(args.parquet), client, critic)
    except (ValueError, FileNotFoundError) as err:
        print(f"nla-mcore explain: error: {err}", file=sys.stderr)
        return 2
    records, stats = explain_rows(client, critic, rows, args)
    out = Path(args.out) if args.out else Path(f"explain_{Path(args.parquet).stem}")
    header = dict(
        parquet=args.parquet,
        av=args.av,
        ar=args.ar,
        rows=args.rows,
        av_info=f"stage {client.dir.sidecar.stage}, injection_scale {client.injection_scale:g}",
        decoding="greedy"
        if args.temperature == 0
        else f"sampled (temperature {args.temperature}, top-p {args.top_p}, seed {args.seed})",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    md, jsonl = out.with_name(out.name + ".md"), out.with_name(out.name + ".jsonl")
    write_text_atomically(md, markdown(records, stats, header))
    write_text_atomically(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(
        f"[explain] {summary_line(stats)}; {time.monotonic() - started:.1f} s\n"
        f"[explain] wrote {md} and {jsonl}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
