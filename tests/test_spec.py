"""JobSpec: validation, hashing, redaction and spec files."""

from __future__ import annotations

import json

import pytest

from ratefit.codecs.rate import Target
from ratefit.jobs.spec import DEFAULT_EXTENSIONS, JobSpec, SpecError, load_spec_file

SECRETS = {"key": "AKIAEXAMPLE", "secret": "s3cr3tvalue", "token": "tok3nvalue",
           "client_kwargs": {"endpoint_url": "http://localhost:8333", "aws_secret_access_key": "inner5ecret"}}


def spec(**kw) -> JobSpec:
    base = dict(input="in", output="out", codec="jpeg", target_bpp=1.0)
    base.update(kw)
    return JobSpec(**base)


# -------------------------------------------------------------------------- validation

def test_a_valid_spec_normalises_its_fields():
    s = spec(target_bpp=1, extensions="png, .JPG ,webp")
    assert s.target_bpp == 1.0 and isinstance(s.target_bpp, float)
    assert s.extensions == (".png", ".jpg", ".webp")
    assert s.default_target() == Target("bpp", 1.0)
    assert spec(target_bpp=None, target_psnr=38).default_target() == Target("psnr", 38.0)


@pytest.mark.parametrize("targets,named", [
    ({"target_bpp": 1.0, "target_psnr": 30.0}, ["target_bpp", "target_psnr"]),
    ({"target_bpp": 1.0, "target_bytes": 1000}, ["target_bpp", "target_bytes"]),
    ({"target_bytes": 1000, "target_psnr": 30.0}, ["target_bytes", "target_psnr"]),
])
def test_two_targets(targets, named):
    with pytest.raises(SpecError) as info:
        spec(**{"target_bpp": None, **targets})
    for name in named:
        assert name in str(info.value)


def test_no_target_for_a_folder_input():
    with pytest.raises(SpecError, match="no target") as info:
        spec(target_bpp=None)
    assert "target-bpp" in str(info.value)


def test_no_target_is_fine_for_a_listing_or_decompress():
    assert spec(input="list.parquet", target_bpp=None).default_target() is None
    assert spec(input="s3://b/LIST.CSV", target_bpp=None).is_listing
    assert spec(kind="decompress", target_bpp=None).default_target() is None


@pytest.mark.parametrize("field,value", [
    ("target_bpp", 0), ("target_bpp", -1), ("target_bpp", float("nan")), ("target_bpp", float("inf")),
    ("target_bpp", "abc"), ("target_bytes", 0), ("target_psnr", -3),
])
def test_bad_target_values(field, value):
    kw = {"target_bpp": None, field: value}
    with pytest.raises(SpecError, match=f"^{field}:"):
        spec(**kw)


@pytest.mark.parametrize("field,value", [
    ("shard_size", 0), ("shard_size", -1), ("shard_size", 1.5), ("shard_size", True), ("shard_size", "16"),
    ("max_pixels", 0), ("max_pixels", 1e8),
    ("workers", 0), ("workers", -2), ("workers", 2.0),
    ("gpus_per_worker", -1), ("gpus_per_worker", 9),
    ("kind", "transcode"),
    ("extensions", ()), ("extensions", ""),
])
def test_bad_fields_name_the_field(field, value):
    with pytest.raises(SpecError) as info:
        spec(**{field: value})
    assert field in str(info.value)


@pytest.mark.parametrize("field", ["input", "output"])
@pytest.mark.parametrize("value", ["", None])
def test_input_and_output_are_required(field, value):
    with pytest.raises(SpecError, match=f"^{field}:"):
        spec(**{field: value})


@pytest.mark.parametrize("field", ["storage_options", "codec_options"])
def test_options_must_be_mappings(field):
    with pytest.raises(SpecError, match=field):
        spec(**{field: ["key", "value"]})


def test_unknown_codec():
    with pytest.raises(SpecError, match="^codec:") as info:
        spec(codec="jpeg2000-not-here")
    assert "jpeg2000-not-here" in str(info.value) and "jpeg" in str(info.value)


def test_unknown_codec_is_fine_for_decompress():
    # decompression takes the codec from each container's header
    assert spec(kind="decompress", codec="whatever", target_bpp=None).kind == "decompress"


def test_non_numeric_gpus_per_worker_is_a_spec_error():
    with pytest.raises(SpecError, match="gpus_per_worker"):
        spec(gpus_per_worker="half")


def test_bool_workers_is_a_spec_error():
    with pytest.raises(SpecError, match="workers"):
        spec(workers=True)


# ---------------------------------------------------------------------------- from_dict

def test_from_dict_round_trip():
    s = spec(storage_options={"anon": True}, extensions=(".png",), shard_size=4)
    again = JobSpec.from_dict(s.to_dict(redacted=False))
    assert again == s
    assert again.spec_hash() == s.spec_hash()


def test_from_dict_accepts_a_list_of_extensions():
    s = JobSpec.from_dict({"input": "in", "output": "out", "codec": "jpeg", "target_psnr": 35,
                           "extensions": ["PNG", ".jpg"]})
    assert s.extensions == (".png", ".jpg")


def test_from_dict_unknown_field():
    with pytest.raises(SpecError, match="unknown spec field") as info:
        JobSpec.from_dict({"input": "in", "output": "out", "target_bpp": 1, "codec": "jpeg",
                           "target_bitrate": 3, "colour": "red"})
    msg = str(info.value)
    assert "target_bitrate" in msg and "colour" in msg
    assert "target_bpp" in msg      # lists the known fields


def test_from_dict_validates():
    with pytest.raises(SpecError, match="shard_size"):
        JobSpec.from_dict({"input": "in", "output": "out", "target_bpp": 1, "codec": "jpeg", "shard_size": 0})


# ---------------------------------------------------------------------------- spec_hash

def test_spec_hash_is_stable():
    a, b = spec(), spec()
    assert a.spec_hash() == b.spec_hash()
    assert a.spec_hash() == a.spec_hash()
    assert len(a.spec_hash()) == 64 and int(a.spec_hash(), 16) >= 0
    assert spec(target_bpp=1).spec_hash() == spec(target_bpp=1.0).spec_hash()
    assert spec(extensions="png,jpg").spec_hash() == spec(extensions=(".PNG", "jpg")).spec_hash()


@pytest.mark.parametrize("change", [
    {"codec_options": {"quality_boost": 1}},
    {"weights": "w.safetensors"},
    {"refine_steps": 5},
    {"kind": "decompress", "target_bpp": None},
])
def test_spec_hash_changes_with_what_changes_an_outputs_bytes(change):
    assert spec(**change).spec_hash() != spec().spec_hash()


@pytest.mark.parametrize("change", [
    {"target_bpp": 1.01},
    {"target_bpp": None, "target_bytes": 1.0},
    {"target_bpp": None, "target_psnr": 1.0},
    {"codec": "webp"},
    {"input": "other"},
    {"shard_size": 17},
    {"max_pixels": 1000},
    {"ms_ssim": False},
    {"extensions": (".png",)},
])
def test_a_compress_jobs_hash_leaves_what_each_row_records_or_only_plans_to_its_runs(change):
    """Codec and target are in every row: an incremental run re-plans the items whose codec or
    target changed (tests/test_incremental.py), so the job is not refused for them."""
    assert spec(**change).spec_hash() == spec().spec_hash()


@pytest.mark.parametrize("change", [
    {"codec": "webp"},
    {"codec_options": {"quality_boost": 1}},
    {"input": "other"},
    {"shard_size": 17},
    {"max_pixels": 1000},
    {"extensions": (".png",)},
    {"budget_bytes": 2000.0},
    {"objective": "mse"},
    {"probes": 4},
])
def test_a_budget_jobs_hash_covers_its_shards_and_plan(change):
    """Budget jobs resume by shard and reuse their plan: both must be the same."""
    base = {"target_bpp": None, "budget_bytes": 1000.0}
    assert spec(**{**base, **change}).spec_hash() != spec(**base).spec_hash()


def test_records_of_older_hash_versions_compare_on_their_stored_spec():
    s = spec()
    old = {"kind": "compress", "spec_hash": "0" * 64, "spec": spec(target_bpp=2.0).to_dict(redacted=True)}
    assert s.same_job(old)   # v1 hashed the target; today a target change is re-planned, not refused
    assert not s.same_job({**old, "spec": spec(codec_options={"quality_boost": 1}).to_dict(redacted=True)})
    assert s.same_job({"spec_hash_version": s.HASH_VERSION, "spec_hash": s.spec_hash()})
    assert not s.same_job({"spec_hash_version": s.HASH_VERSION, "spec_hash": "0" * 64})


@pytest.mark.parametrize("change", [
    {"workers": 7},
    {"overwrite": True},
    {"storage_options": SECRETS},
    {"storage_options": {"anon": True}},
    {"address": "ray://head:10001"},
    {"progress": False},
    {"gpus_per_worker": 0.5},
])
def test_spec_hash_ignores_how_the_job_runs(change):
    assert spec(**change).spec_hash() == spec().spec_hash()


def test_spec_hash_sees_codec_options_with_secret_looking_names():
    assert spec(codec_options={"model_key": "small"}).spec_hash() != \
        spec(codec_options={"model_key": "large"}).spec_hash()


# --------------------------------------------------------------------------- to_dict

def test_to_dict_redacts_storage_secrets():
    s = spec(storage_options=SECRETS, input="s3://user:pa55word@host/in", address="ray://u:pw77@head:10001")
    d = s.to_dict(redacted=True)
    assert d["storage_options"]["key"] == "***"
    assert d["storage_options"]["secret"] == "***"
    assert d["storage_options"]["token"] == "***"
    assert d["storage_options"]["client_kwargs"] == {"endpoint_url": "http://localhost:8333",
                                                     "aws_secret_access_key": "***"}
    text = json.dumps(d)
    for secret in ("AKIAEXAMPLE", "s3cr3tvalue", "tok3nvalue", "inner5ecret", "pa55word", "pw77"):
        assert secret not in text
    assert "host/in" in d["input"]
    # the spec itself keeps the real values
    assert s.storage_options["secret"] == "s3cr3tvalue"


def test_to_dict_is_redacted_by_default_and_json_serialisable():
    d = spec(storage_options=SECRETS).to_dict()
    assert d["storage_options"]["secret"] == "***"
    assert isinstance(d["extensions"], list)
    json.dumps(d)


def test_to_dict_unredacted_keeps_everything():
    d = spec(storage_options=SECRETS).to_dict(redacted=False)
    assert d["storage_options"] == SECRETS
    assert d["extensions"] == list(DEFAULT_EXTENSIONS)


# ---------------------------------------------------------------------------- spec files

def test_load_spec_file_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "input: s3://bucket/in\n"
        "output: s3://bucket/out\n"
        "codec: webp\n"
        "target_psnr: 38.5\n"
        "extensions: [png, jpg]\n"
        "storage_options:\n"
        "  anon: false\n"
        "  client_kwargs:\n"
        "    endpoint_url: http://localhost:8333\n",
        encoding="utf-8")
    data = load_spec_file(str(path))
    assert data["target_psnr"] == 38.5
    assert data["storage_options"]["client_kwargs"]["endpoint_url"] == "http://localhost:8333"
    s = JobSpec.from_dict(data)
    assert s.codec == "webp" and s.extensions == (".png", ".jpg")
    assert s.default_target() == Target("psnr", 38.5)


def test_load_spec_file_json(tmp_path):
    path = tmp_path / "job.json"
    body = {"input": "in", "output": "out", "codec": "jpeg", "target_bytes": 20000, "shard_size": 4}
    path.write_text(json.dumps(body), encoding="utf-8")
    data = load_spec_file(str(path))
    assert data == body
    assert JobSpec.from_dict(data).shard_size == 4


def test_load_spec_file_via_file_url(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: in\noutput: out\n", encoding="utf-8")
    assert load_spec_file(path.as_uri()) == {"input": "in", "output": "out"}


def test_load_spec_file_missing(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec_file(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("text,match", [
    ("input: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("just a string\n", "mapping"),
    ("", "mapping"),
])
def test_load_spec_file_bad_contents(tmp_path, text, match):
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError, match=match):
        load_spec_file(str(path))
