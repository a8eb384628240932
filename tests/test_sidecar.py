"""The nla_meta.yaml contract: files of the original project must load, our files must round-trip,
and every kind of drift between a sidecar and the live tokenizer must be refused by name."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

import pytest
import yaml

from nla_mcore import prompts, sidecar
from nla_mcore.sidecar import (
    DatasetExtraction,
    DatasetSidecar,
    Extraction,
    ModelSidecar,
    Provenance,
    SidecarDriftError,
    SidecarError,
)
from nla_mcore.toy_tokenizers import FAMILIES, build_toy_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "sidecars"
AV_V1 = FIXTURES / "qwen2.5-7b-L20-av-v1"
AR_V1 = FIXTURES / "qwen2.5-7b-L20-ar-v1"
AR_SFT_PARQUET = FIXTURES / "qwen2.5-7b-L20-ar_sft_train.parquet"
QWEN_SUFFIX_IDS = [1318, 29, 366, 1708, 29]


@cache
def toy(family: str):
    return build_toy_tokenizer(family)


def toy_av_sidecar(family: str = "qwen2", **changes) -> ModelSidecar:
    fields = dict(
        role="av",
        stage="sl",
        d_model=64,
        base_checkpoint=f"toy/{family}",
        extraction=Extraction(injection_scale=150.0, mse_scale=8.0),
        tokens=sidecar.make_tokens(toy(family), ar_template=prompts.AR_PROMPT_TEMPLATE),
        extraction_layer_index=2,
        training={"step": 10, "lr": 2e-5, "global_batch_size": 8},
        provenance=Provenance(created_at="2026-11-25T00:00:00+00:00", created_by="nla-mcore test"),
    )
    return ModelSidecar(**{**fields, **changes})


def toy_dataset_sidecar(stage: str = "ar_sft") -> DatasetSidecar:
    return DatasetSidecar(
        stage=stage,
        row_count=128,
        extraction=DatasetExtraction(
            base_model="toy/qwen2",
            d_model=64,
            layer_index=2,
            corpus="embedded",
            corpus_slice="[0:16]",
            positions_per_doc=10,
        ),
        tokens=sidecar.make_tokens(toy("qwen2"), ar_template=prompts.AR_PROMPT_TEMPLATE),
        prompt_templates=sidecar.PromptTemplates(),
        api_summaries={"model": "offline", "max_tokens": 200, "temperature": 1.0},
        parent_datasets=["base.parquet"],
    )


def rewrite_fixture(source_dir: Path, target_dir: Path, edit) -> Path:
    """Copy a model fixture, apply ``edit`` to its parsed YAML, write it back."""
    target_dir.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((source_dir / "nla_meta.yaml").read_text())
    edit(raw)
    (target_dir / "nla_meta.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    return target_dir


# --- files of the original project -------------------------------------------------------------


def test_reads_the_original_av_sidecar():
    """Released AV checkpoints say role `actor` and template keys `actor`/`critic`, and spell
    mse_scale as the sentinel 'sqrt_d_model'; they must load with our names and values."""
    meta = sidecar.read_model_sidecar(AV_V1)
    assert meta.role == "av" and meta.stage == "rl" and meta.d_model == 3584
    assert meta.extraction.injection_scale == 150.0
    assert meta.extraction.mse_scale == pytest.approx(math.sqrt(3584))
    assert meta.extraction_layer_index == 20
    assert (meta.tokens.injection_char, meta.tokens.injection_token_id) == ("\u320e", 149705)
    assert (meta.tokens.injection_left_neighbor_id, meta.tokens.injection_right_neighbor_id) == (
        29,
        522,
    )
    assert meta.prompt_templates.av == prompts.AV_PROMPT_TEMPLATE
    assert meta.prompt_templates.ar == prompts.AR_PROMPT_TEMPLATE
    assert meta.provenance.created_by == "nla.train_actor.NLAFSDPActor"


def test_reads_the_original_v1_ar_sidecar_with_num_hidden_layers():
    """A v1 AR records its depth K+1 = 21 instead of K; K must come out as 20 (an AR with K
    layers capped FVE at ~0.32), and injection_scale is null for an AR."""
    meta = sidecar.read_model_sidecar(AR_V1)
    assert meta.role == "ar"
    assert meta.extraction_layer_index == 20
    assert meta.extraction.injection_scale is None
    assert meta.tokens.critic_suffix_ids == QWEN_SUFFIX_IDS
    assert meta.critic_extra == {"value_head": "value_head.safetensors"}


def test_reads_the_original_dataset_sidecar():
    """Dataset sidecars sit beside the parquet as `{file}.nla_meta.yaml`; the parquet itself is
    not needed to read them."""
    meta = sidecar.read_dataset_sidecar(AR_SFT_PARQUET)
    assert meta.stage == "ar_sft" and meta.row_count == 124580
    assert dataclasses.astuple(meta.extraction)[:4] == (
        "Qwen/Qwen2.5-7B-Instruct",
        3584,
        20,
        "none",
    )
    assert meta.extraction.positions_per_doc == 10
    assert meta.tokens.critic_suffix_ids == QWEN_SUFFIX_IDS
    assert meta.prompt_templates.av == prompts.AV_PROMPT_TEMPLATE
    assert meta.api_summaries["failed_parses"] == 611


def test_original_files_round_trip_with_unknown_keys_kept(tmp_path):
    """Rewriting an original file normalises names (av/ar) but keeps every unknown key, at the
    top level and inside sections, and reads back to the same object."""
    av = sidecar.read_model_sidecar(AV_V1)
    sidecar.write_model_sidecar(tmp_path / "av", av)
    written = yaml.safe_load((tmp_path / "av" / "nla_meta.yaml").read_text())
    assert written["role"] == "av" and set(written["prompt_templates"]) == {"av", "ar"}
    assert written["rollout"] == {"n_samples_per_prompt": 8, "max_response_len": 150}
    assert written["extraction"]["norm"] == "none"
    assert written["extraction_layer_index"] == written["critic"]["extraction_layer_index"] == 20
    assert sidecar.read_model_sidecar(tmp_path / "av") == av

    ar = sidecar.read_model_sidecar(AR_V1)
    sidecar.write_model_sidecar(tmp_path / "ar", ar)
    assert sidecar.read_model_sidecar(tmp_path / "ar") == ar

    dataset = sidecar.read_dataset_sidecar(AR_SFT_PARQUET)
    sidecar.write_dataset_sidecar(tmp_path / "split.parquet", dataset)
    written = yaml.safe_load((tmp_path / "split.parquet.nla_meta.yaml").read_text())
    assert written["extraction"]["max_length"] == 4096
    assert sidecar.read_dataset_sidecar(tmp_path / "split.parquet") == dataset


def test_num_hidden_layers_is_also_read_at_the_top_level(tmp_path):
    """Where exactly v1 files put the AR depth varies; the top-level spelling must work too."""

    def move_depth(raw):
        raw["num_hidden_layers"] = raw.pop("critic")["num_hidden_layers"]

    meta = sidecar.read_model_sidecar(rewrite_fixture(AR_V1, tmp_path, move_depth))
    assert meta.extraction_layer_index == 20


# --- our own files -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_model_sidecar_round_trip(family, tmp_path):
    """What training writes is what inference reads, field for field."""
    meta = toy_av_sidecar(family)
    path = sidecar.write_model_sidecar(tmp_path, meta)
    assert path == tmp_path / "nla_meta.yaml"
    assert sidecar.read_model_sidecar(tmp_path) == meta
    assert sidecar.check_marker(sidecar.read_model_sidecar(tmp_path), toy(family)).ids


def test_dataset_sidecar_round_trip(tmp_path):
    """Datagen writes one sidecar per split; the trainers read it back unchanged."""
    meta = toy_dataset_sidecar()
    path = sidecar.write_dataset_sidecar(tmp_path / "ar_sft.parquet", meta)
    assert path.name == "ar_sft.parquet.nla_meta.yaml"
    assert sidecar.read_dataset_sidecar(tmp_path / "ar_sft.parquet") == meta


def test_mse_scale_defaults_to_sqrt_d_and_null_means_raw(tmp_path):
    """Absent mse_scale means √d; an explicit null is the original's opt-out (no rescale)."""
    absent = rewrite_fixture(AV_V1, tmp_path / "a", lambda raw: raw["extraction"].pop("mse_scale"))
    assert sidecar.read_model_sidecar(absent).extraction.mse_scale == pytest.approx(math.sqrt(3584))

    def set_null(raw):
        raw["extraction"]["mse_scale"] = None

    assert (
        sidecar.read_model_sidecar(
            rewrite_fixture(AV_V1, tmp_path / "n", set_null)
        ).extraction.mse_scale
        is None
    )


def test_write_is_atomic(tmp_path, monkeypatch):
    """A crash mid-write must leave the previous sidecar intact and no temporary file behind."""
    sidecar.write_model_sidecar(tmp_path, toy_av_sidecar())
    before = (tmp_path / "nla_meta.yaml").read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        sidecar.write_model_sidecar(tmp_path, toy_av_sidecar(stage="rl"))
    assert (tmp_path / "nla_meta.yaml").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nla_meta.yaml"]


def test_write_validates_before_writing(tmp_path):
    """An invalid sidecar (an AV without injection_scale) must never reach the disk."""
    bad = toy_av_sidecar()
    bad.extraction.injection_scale = None
    with pytest.raises(SidecarError, match="extraction.injection_scale"):
        sidecar.write_model_sidecar(tmp_path, bad)
    assert not (tmp_path / "nla_meta.yaml").exists()


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("extra", {"anthropic_api_key": "sk-ant-api03-abcdefghijklmnop"}),
        ("training", {"hf_token": "anything"}),
        ("training", {"note": "sk-ant-api03-abcdefghijklmnopqrstuvwxyz"}),
    ],
)
def test_secrets_are_never_written(tmp_path, where, value):
    """Configs copied into `training` or extra keys may carry credentials; writing must refuse."""
    with pytest.raises(SidecarError, match="secret|API key"):
        sidecar.write_model_sidecar(tmp_path, toy_av_sidecar(**{where: value}))
    assert not (tmp_path / "nla_meta.yaml").exists()


# --- validation errors name the file and the key -----------------------------------------------


def _drop_injection_scale(raw):
    raw["extraction"]["injection_scale"] = None


def _unknown_role(raw):
    raw["role"] = "policy"


def _wrong_kind(raw):
    raw["kind"] = "nla_dataset"


def _template_without_slot(raw):
    raw["prompt_templates"]["actor"] = raw["prompt_templates"]["actor"].replace(
        "{injection_char}", ""
    )


def _template_with_two_slots(raw):
    raw["prompt_templates"]["actor"] += " {injection_char}"


def _templates_disagree(raw):
    raw["prompt_templates"]["av"] = prompts.AV_PROMPT_TEMPLATE + " Thanks."


def _token_id_not_int(raw):
    raw["tokens"]["injection_token_id"] = "149705"


def _missing_d_model(raw):
    del raw["d_model"]


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (_drop_injection_scale, "extraction.injection_scale"),
        (_unknown_role, "role"),
        (_wrong_kind, "kind"),
        (_template_without_slot, "prompt_templates.actor"),
        (_template_with_two_slots, "prompt_templates.actor"),
        (_templates_disagree, "prompt_templates.av"),
        (_token_id_not_int, "tokens.injection_token_id"),
        (_missing_d_model, "d_model"),
    ],
)
def test_invalid_av_sidecars_name_the_file_and_key(tmp_path, edit, key):
    """A user fixing a broken sidecar needs to know which file and which key."""
    directory = rewrite_fixture(AV_V1, tmp_path, edit)
    with pytest.raises(SidecarError) as excinfo:
        sidecar.read_model_sidecar(directory)
    message = str(excinfo.value)
    assert str(directory / "nla_meta.yaml") in message
    assert re.search(rf"(^|\s){re.escape(key)}:", message), message


def test_ar_depth_that_contradicts_k_is_refused(tmp_path):
    """K and K+1 recorded inconsistently is the 'AR with K layers' failure mode."""

    def contradict(raw):
        raw["critic"]["extraction_layer_index"] = 21

    with pytest.raises(
        SidecarError, match=r"critic.extraction_layer_index.*critic.num_hidden_layers - 1"
    ):
        sidecar.read_model_sidecar(rewrite_fixture(AR_V1, tmp_path, contradict))


def test_ar_without_a_layer_index_is_refused(tmp_path):
    """The AR's architecture is K+1 layers: without K it cannot be built."""

    def drop(raw):
        del raw["critic"]["num_hidden_layers"]

    with pytest.raises(SidecarError, match="critic.extraction_layer_index"):
        sidecar.read_model_sidecar(rewrite_fixture(AR_V1, tmp_path, drop))


def _write_dataset(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(Path(f"{AR_SFT_PARQUET}.nla_meta.yaml").read_text())
    edit(raw)
    parquet = tmp_path / "split.parquet"
    Path(f"{parquet}.nla_meta.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    return parquet


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda raw: raw["extraction"].update(norm="whiten"), "extraction.norm"),
        (lambda raw: raw["tokens"].pop("critic_suffix_ids"), "tokens.critic_suffix_ids"),
        (lambda raw: raw.update(stage="eval"), "stage"),
        (lambda raw: raw.update(row_count=-1), "row_count"),
        (lambda raw: raw["extraction"].pop("layer_index"), "extraction.layer_index"),
    ],
)
def test_invalid_dataset_sidecars_name_the_file_and_key(tmp_path, edit, key):
    """Whitened vectors read as raw, or an AR split without its suffix, train silently wrong."""
    parquet = _write_dataset(tmp_path, edit)
    with pytest.raises(SidecarError) as excinfo:
        sidecar.read_dataset_sidecar(parquet)
    assert f"{parquet}.nla_meta.yaml" in str(excinfo.value)
    assert f"{key}:" in str(excinfo.value)


def test_missing_and_malformed_files(tmp_path):
    """A directory without a sidecar is not an NLA checkpoint; broken YAML names the file."""
    with pytest.raises(FileNotFoundError, match="nla_meta.yaml"):
        sidecar.read_model_sidecar(tmp_path)
    (tmp_path / "nla_meta.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(SidecarError, match="not valid YAML"):
        sidecar.read_model_sidecar(tmp_path)


# --- drift against the live tokenizer ----------------------------------------------------------


def _shift_id(field_name: str):
    def edit(meta: ModelSidecar) -> None:
        setattr(meta.tokens, field_name, getattr(meta.tokens, field_name) + 1)

    return edit


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "field_name",
    ["injection_token_id", "injection_left_neighbor_id", "injection_right_neighbor_id"],
)
def test_id_drift_is_detected_and_named(family, field_name):
    """A changed vocabulary or template shifts the injection site; the error must say which field
    drifted and give the expected and the found id."""
    meta = toy_av_sidecar(family)
    expected = getattr(meta.tokens, field_name) + 1
    _shift_id(field_name)(meta)
    with pytest.raises(SidecarDriftError, match=rf"tokens\.{field_name} drifted") as excinfo:
        sidecar.check_marker(meta, toy(family))
    assert str(expected) in str(excinfo.value)


def test_marker_appearing_twice_is_detected():
    """Someone pasting the glyph into the template makes the injection site ambiguous."""
    meta = toy_av_sidecar()
    meta.prompt_templates.av = meta.prompt_templates.av.replace(
        "Here is the vector", f"Here is the vector {meta.tokens.injection_char}"
    )
    with pytest.raises(SidecarDriftError, match=r"prompt_templates\.av drifted.*2 times"):
        sidecar.check_marker(meta, toy("qwen2"))


def test_marker_slot_removed_is_detected():
    """A template edited in code (not read from a file) without its slot must also be refused."""
    meta = toy_av_sidecar()
    meta.prompt_templates.av = "Describe <concept></concept>."
    with pytest.raises(SidecarDriftError, match=r"prompt_templates\.av drifted.*0 times"):
        sidecar.check_marker(meta, toy("qwen2"))


def test_sidecar_for_another_tokenizer_is_refused():
    """The released Qwen sidecar checked against a different vocabulary (here the toy Qwen) must
    fail on the marker id before anything is injected."""
    meta = sidecar.read_model_sidecar(AV_V1)
    with pytest.raises(SidecarDriftError, match=r"tokens\.injection_token_id drifted.*149705"):
        sidecar.check_marker(meta, toy("qwen2"))


def test_sidecar_of_one_family_is_refused_by_another():
    """Pairing a llama sidecar with a gemma tokenizer is caught by the marker check."""
    with pytest.raises(SidecarDriftError, match="injection_token_id"):
        sidecar.check_marker(toy_av_sidecar("llama"), toy("gemma3"))


def test_ar_suffix_drift_is_detected():
    """critic_suffix_ids recorded by datagen must match the live tokenizer's AR suffix."""
    meta = toy_av_sidecar()
    assert sidecar.check_ar_suffix(meta, toy("qwen2")) == meta.tokens.critic_suffix_ids
    meta.tokens.critic_suffix_ids = [*meta.tokens.critic_suffix_ids[:-1], 0]
    with pytest.raises(SidecarDriftError, match=r"tokens\.critic_suffix_ids drifted"):
        sidecar.check_ar_suffix(meta, toy("qwen2"))


def test_dataset_sidecar_is_checked_like_a_model_sidecar():
    """Datagen output is checked against the trainer's tokenizer with the same function."""
    meta = toy_dataset_sidecar()
    assert (
        sidecar.check_marker(meta, toy("qwen2")).left_id == meta.tokens.injection_left_neighbor_id
    )
    with pytest.raises(SidecarDriftError):
        sidecar.check_marker(meta, toy("llama"))


# --- provenance --------------------------------------------------------------------------------


def test_provenance_fields():
    """created_at is UTC ISO 8601 and created_by names this project, so files are traceable."""
    prov = Provenance.current()
    stamp = datetime.fromisoformat(prov.created_at)
    assert stamp.utcoffset() == timezone.utc.utcoffset(None)
    assert prov.created_by.startswith("nla-mcore ")


def test_git_commit_outside_a_checkout_is_none(tmp_path):
    """Installed copies and exported tarballs have no git: best effort means None, not a crash."""
    assert sidecar.git_commit(tmp_path) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")
def test_git_commit_reads_head(tmp_path):
    """Inside a checkout the commit hash is recorded."""
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run(
        ["git", "commit", "-q", "--allow-empty", "-m", "x"], cwd=tmp_path, check=True, env=env
    )
    assert re.fullmatch(r"[0-9a-f]{40}", sidecar.git_commit(tmp_path))
