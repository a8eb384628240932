"""Megatron-Core extraction: the same vectors at every layout, equal to Hugging Face's, and the same
files from TP2, PP2 and DP2 jobs as from a one-rank job (also after a resume under two ranks).

Models: `convert_worker.make_hf_model` (every weight random, norms included, so a mapping error
cannot hide behind ones) of Llama (Llama-3 RoPE scaling) and Gemma-3 (sliding-window layers,
sqrt(d) embedding scale, zero-centred norms, QK-norm), K = 2 of 4 blocks. All in float32.

Two launches cover everything (a rank start costs ~6 s of imports on the 2-core CI machine):
one rank (TP1 vectors, a full `nla-mcore datagen` job) and two ranks (TP2, TP2+SP, PP2, CP2
vectors; TP2, PP2 and DP2 jobs; a TP2 resume).

Tolerance: |difference| <= 5e-6 x the largest |entry| of the reference vectors (Gemma's reach
~9 through its sqrt(d) embedding scale, Llama's ~0.8). Observed worst, relative to that scale:
PP2 0 (the same GEMMs); CP2 3e-7 (attention over gathered keys); TP1 vs transformers 4e-7
(other padded shapes reassociate the GEMM sums); TP2 6e-7 (row-parallel projections add partial
products in another order). The bound leaves about eight times the worst, while any mapping,
padding, SP/CP reordering or pipeline error moves entries by O(1) of the scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datagen_toys import documents, rows_of, write_jsonl
from mcore_extract_worker import LAYER, both

from nla_mcore.datagen.providers import HFActivationProvider
from tests.converters.convert_worker import make_hf_model
from tests.multirank import run_ranks

FAMILIES = ("llama", "gemma3")
TWO_RANK_LAYOUTS = {
    "tp2": dict(tensor_parallel=2),
    "tp2_sp": dict(tensor_parallel=2, sequence_parallel=True),
    "pp2": dict(pipeline_parallel=2),
    "cp2": dict(context_parallel=2),
}
RELATIVE_TOLERANCE = 5e-6
LENGTHS = (97, 61, 131, 52, 75)  # the longest odd (Gemma-3 window mask), none a multiple of 8


def fixed_batch(vocab_size: int = 1536) -> tuple[list[list[int]], list[list[int]]]:
    """Five documents of uneven lengths and their positions (first, last, and in between)."""
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]
    positions = [sorted({0, n // 3, n // 2, n - 1}) for n in LENGTHS]
    return ids, positions


def datagen_argv(hf_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    """A whole `nla-mcore datagen` job on the CPU: small shards, offline explainer, no bars."""
    return [
        f"output_dir={out}",
        f"model.hf_dir={hf_dir}",
        "model.dtype=float32",
        "device=cpu",
        f"extract.layer={LAYER}",
        f"extract.corpus.paths=[{corpus}]",
        "extract.positions_per_doc=3",
        "extract.max_length=160",
        "extract.batch_tokens=640",
        "extract.batch_docs=4",
        "extract.rows_per_shard=24",
        "extract.progress=false",
        "split.progress=false",
        "explain.explainer=offline",
        f"explain.cache_dir={out.parent / 'cache'}",
        "explain.progress=false",
        "build.progress=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both launches, their models, batch and outputs (computed once for the module)."""
    root = tmp_path_factory.mktemp("mcore_extract")
    models = {family: make_hf_model(family, root / family) for family in FAMILIES}
    ids, positions = fixed_batch()
    corpus = write_jsonl(root / "corpus.jsonl", documents(40, seed=5, max_paragraphs=4))
    gemma = models["gemma3"]
    one_rank = [(f"{f}/tp1", str(models[f]), {}, ids, positions) for f in FAMILIES]
    two_rank = [
        (f"{f}/{name}", str(models[f]), parallel, ids, positions)
        for f in FAMILIES
        for name, parallel in TWO_RANK_LAYOUTS.items()
    ]
    one_rank_job = (datagen_argv(gemma, corpus, root / "tp1"), None)
    tp2 = datagen_argv(gemma, corpus, root / "tp2", "parallel.tensor_parallel=2")
    two_rank_jobs = [
        (tp2, None),
        (datagen_argv(gemma, corpus, root / "pp2", "parallel.pipeline_parallel=2"), None),
        (datagen_argv(gemma, corpus, root / "dp2", "stages=[extract]"), None),
        (tp2, str(root / "tp2" / "activations")),  # forget its last shard, run again
    ]
    ((single, _),) = run_ranks(both, 1, one_rank, [one_rank_job])
    per_rank = run_ranks(both, 2, two_rank, two_rank_jobs)
    return dict(
        root=root,
        models=models,
        ids=ids,
        positions=positions,
        single=single,
        double=[layouts for layouts, _ in per_rank],
        forgotten=per_rank[0][1][-1],
    )


def hf_reference(hf_dir: Path, ids, positions) -> list[np.ndarray]:
    return HFActivationProvider(hf_dir, LAYER, dtype=torch.float32).activations(ids, positions)


def unbatched_hidden_states(hf_dir: Path, ids, positions) -> list[np.ndarray]:
    """HF `hidden_states[K+1]` of each document alone (no padding, no batch)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for doc, pos in zip(ids, positions, strict=True):
            hidden = model(input_ids=torch.tensor([doc]), output_hidden_states=True).hidden_states
            out.append(hidden[LAYER + 1][0, pos].numpy())
    return out


def assert_vectors_close(actual, expected, what: str) -> None:
    """Every document's vectors within RELATIVE_TOLERANCE of the batch's scale (module doc)."""
    assert len(actual) == len(expected), what
    atol = RELATIVE_TOLERANCE * max(float(np.abs(e).max()) for e in expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        np.testing.assert_allclose(a, e, atol=atol, rtol=0, err_msg=f"{what}, document {i}")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_one_rank_vectors_equal_hf_hidden_states(family, runs):
    """The Megatron-Core provider (K+1 blocks, no final norm, right padding in a batch of five
    uneven documents) must give what Hugging Face gives: the batched `HFActivationProvider` and
    `hidden_states[K+1]` of each document run alone. Tolerance: module docstring."""
    hf_dir = runs["models"][family]
    result = runs["single"][f"{family}/tp1"]
    assert result["is_writer"] and result["holds"]
    reference = hf_reference(hf_dir, runs["ids"], runs["positions"])
    assert_vectors_close(result["vectors"], reference, f"{family} tp1 vs HFActivationProvider")
    alone = unbatched_hidden_states(hf_dir, runs["ids"], runs["positions"])
    assert_vectors_close(result["vectors"], alone, f"{family} tp1 vs hidden_states[K+1]")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", TWO_RANK_LAYOUTS)
def test_two_rank_layouts_give_the_one_rank_vectors(family, layout, runs):
    """TP2, TP2+SP (hidden states gathered over TP), PP2 (3 blocks split 2+1 by the uneven
    split, 4 micro-batches of which the last is padding) and CP2 (load-balanced chunks put back
    in order) must give the one-rank vectors. Exactly one rank writes; it holds the vectors, as
    does every last-stage rank, while the first PP stage returns zeros of the right shape.
    Tolerance: module docstring."""
    per_rank = [rank[f"{family}/{layout}"] for rank in runs["double"]]
    writers = [r for r in per_rank if r["is_writer"]]
    assert len(writers) == 1 and writers[0]["holds"]
    expected = runs["single"][f"{family}/tp1"]["vectors"]
    for rank, result in enumerate(per_rank):
        if result["holds"]:
            assert_vectors_close(result["vectors"], expected, f"{family} {layout} rank {rank}")
        else:
            assert layout == "pp2" and not result["is_writer"]
            assert all(
                not v.any() and v.shape == e.shape
                for v, e in zip(result["vectors"], expected, strict=True)
            )


def shard_files(out: Path) -> list[Path]:
    return sorted((out / "activations").glob("activations-dp*.parquet"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_model_parallel_job_writes_the_files_of_a_one_rank_job(layout, runs):
    """`nla-mcore datagen` at TP2 (rank 0 writes) and PP2 (rank 1 writes, rank 0 runs the later
    stages from the files) must write the shards of a one-rank job: the same files, and in each
    the same rows in the same order (doc ids, positions, texts, token counts, layer), vectors
    within the module's tolerance; and the later stages (split, offline explain, build) must
    give training files with the same rows."""
    one, two = runs["root"] / "tp1", runs["root"] / layout
    assert [p.name for p in shard_files(one)] == [p.name for p in shard_files(two)]
    assert len(shard_files(one)) >= 3  # 40 documents, 8 per shard
    for a, b in zip(shard_files(one), shard_files(two), strict=True):
        ta, tb = pq.read_table(a), pq.read_table(b)
        for column in (
            "doc_id",
            "position",
            "n_raw_tokens",
            "detokenized_text_truncated",
            "activation_layer",
        ):
            assert ta.column(column).to_pylist() == tb.column(column).to_pylist(), (a.name, column)
        va = np.asarray(ta.column("activation_vector").to_pylist(), np.float32)
        vb = np.asarray(tb.column("activation_vector").to_pylist(), np.float32)
        assert_vectors_close([vb], [va], a.name)
    for name in ("av_sft", "ar_sft", "rl"):
        ta, tb = pq.read_table(one / f"{name}.parquet"), pq.read_table(two / f"{name}.parquet")
        assert ta.num_rows == tb.num_rows > 0
        assert ta.column("doc_id").to_pylist() == tb.column("doc_id").to_pylist()
    summary = json.loads((two / "datagen-summary.json").read_text())
    assert summary["extract"]["rows"] == sum(pq.read_table(p).num_rows for p in shard_files(two))


@pytest.mark.slow
def test_dp2_job_writes_the_same_rows_in_two_ranks_files(runs):
    """Two data-parallel replicas (one rank each, both writers) split the corpus by record:
    other files, but their union must be the one-rank job's rows (the extract driver's sharding
    contract, now through `writer_rank_info`). Vectors within the module's tolerance (the
    batches differ, so padded lengths and GEMM shapes do)."""
    one = rows_of(shard_files(runs["root"] / "tp1"))
    dp2_files = shard_files(runs["root"] / "dp2")
    assert {p.name[: len("activations-dp000")] for p in dp2_files} == {
        "activations-dp000",
        "activations-dp001",
    }
    two = rows_of(dp2_files)
    assert one.keys() == two.keys()
    for key, row in one.items():
        assert row["detokenized_text_truncated"] == two[key]["detokenized_text_truncated"]
    keys = sorted(one)
    assert_vectors_close(
        [np.stack([two[k]["activation_vector"] for k in keys])],
        [np.stack([one[k]["activation_vector"] for k in keys])],
        "dp2 vs tp1 rows",
    )


@pytest.mark.slow
def test_tp2_resume_rewrites_the_forgotten_shard_identically(runs):
    """A TP2 job whose last shard is lost (deleted and dropped from the manifest, as a kill
    before the manifest update leaves it) must, when run again, pass over the listed shards on
    both ranks (they agree through the writer's manifest; a rank that disagreed would hang the
    next collective) and write that shard again byte for byte: same layout, same batches, same
    float32 arithmetic."""
    out = runs["root"] / "tp2" / "activations"
    manifest = json.loads((out / "extract-manifest-dp000.json").read_text())
    assert manifest["complete"]
    last = out / manifest["shards"][-1]["file"]
    assert runs["forgotten"] is not None and last.read_bytes() == runs["forgotten"]


def test_a_layout_that_cannot_run_fails_before_any_process_group(tmp_path):
    """A bad layout must cost seconds, not a hung job: it is refused from config.json alone,
    naming what to change. K+1 = 3 blocks cannot fill 4 pipeline stages; 3-way TP cannot split
    4 heads; but 3 blocks on 2 stages is allowed (split 2 + 1), although 3 % 2 != 0."""
    from nla_mcore.config import load_config
    from nla_mcore.datagen.extract_main import MCoreDatagenConfig, check_extraction_layout
    from nla_mcore.runtime.parallel import LayoutError
    from nla_mcore.toy import toy_hf_config

    (tmp_path / "config.json").write_text(json.dumps(toy_hf_config("llama")))

    def layout(*overrides: str) -> MCoreDatagenConfig:
        return load_config(MCoreDatagenConfig, None, [f"model.hf_dir={tmp_path}", *overrides])

    with pytest.raises(LayoutError, match="pipeline_parallel=4"):
        check_extraction_layout(
            layout("extract.layer=2", "parallel.pipeline_parallel=4"), tmp_path, 4
        )
    with pytest.raises(
        LayoutError, match="num_attention_heads=4 is not divisible by tensor_parallel=3"
    ):
        check_extraction_layout(layout("parallel.tensor_parallel=3"), tmp_path, 3)
    assert (
        check_extraction_layout(
            layout("extract.layer=2", "parallel.pipeline_parallel=2"), tmp_path, 2
        )
        == 2
    )
