"""Fuzzing the input loaders (hypothesis): whatever the bytes, they return or raise MuxTuneError, never
anything else; and the CLI turns it into a message and exit code 2, without a traceback."""

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muxtune.cli import main
from muxtune.errors import MuxTuneError
from muxtune.executor.backbone import ByteTokenizer
from muxtune.executor.checkpoint import load_manifest
from muxtune.executor.data import DataOptions, load_examples
from muxtune.spec import Plan, load_config, load_task

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TOKENIZER = ByteTokenizer()
DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "qa.jsonl"

# JSON-ish values, and YAML documents built from them around the keys the loaders know
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["lora", "ia3", "prompt", "prefix", "dora", "adapter",
                                                           "bitfit", "cpu", "cuda:0", "builtin:tiny-llama",
                                                           str(DATA), "q_proj", "auto", "chat", "skip",
                                                           "user", "assistant", "tool", "function", "human", "gpt",
                                                           "function_call", "observation", "{}", "[]"]))
keys = st.sampled_from(["name", "model", "devices", "dtype", "tasks", "data", "peft", "method", "r", "alpha",
                        "target_modules", "batch_size", "max_seq_len", "lr", "steps", "seed", "checkpoint_every",
                        "memory_limit_gib", "num_virtual_tokens", "data_format", "on_bad_line", "messages",
                        "role", "content", "prompt", "completion", "text", "groups", "layout", "devices",
                        "conversations", "from", "value", "weight", "name", "tools", "tool_calls", "tool_call_id",
                        "function_call", "function", "arguments", "id", "type", "system", "functions"])
values = st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=4),
                                                          st.dictionaries(keys, children, max_size=6)), max_leaves=25)
documents = st.one_of(
    st.text(max_size=300),
    values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    st.builds(lambda name, task: yaml.safe_dump({"name": name, "tasks": [task]}),
              st.one_of(st.text(max_size=12), st.just("ok")),
              st.dictionaries(keys, values, max_size=8).map(lambda d: {"name": "t", "data": str(DATA), **d})),
)


def check_only_our_error(load, path):
    try:
        load(path)
    except MuxTuneError as exc:
        assert str(exc)  # a message, never an empty error


@FUZZ
@given(documents)
def test_config_loader_raises_only_muxtune_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        check_only_our_error(load_config, path)
        check_only_our_error(load_task, path)


@FUZZ
@given(st.binary(max_size=300))
def test_config_loader_on_raw_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_bytes(data)
        check_only_our_error(load_config, path)


records = st.one_of(values.map(json.dumps),
                    st.dictionaries(keys, values, max_size=5).map(json.dumps),
                    st.text(max_size=60), st.binary(max_size=60).map(lambda b: b.decode("latin-1")))


@FUZZ
@given(st.lists(records, min_size=0, max_size=6), st.sampled_from(["error", "skip"]),
       st.sampled_from(["auto", "chat", "sharegpt", "prompt_completion", "alpaca", "text"]), st.integers(4, 64))
def test_jsonl_loader_raises_only_muxtune_error(lines, on_bad_line, data_format, max_seq_len):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes("\n".join(lines).encode("utf-8", errors="surrogatepass"))
        options = DataOptions(data_format=data_format, on_bad_line=on_bad_line)
        check_only_our_error(lambda p: load_examples(p, TOKENIZER, max_seq_len, options=options,
                                                     cache_dir=Path(tmp) / "cache"), path)


@FUZZ
@given(st.one_of(values.map(json.dumps), st.text(max_size=200)))
def test_plan_and_manifest_loaders_raise_only_muxtune_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "plan.json"
        plan.write_text(text)
        check_only_our_error(Plan.load, plan)
        (Path(tmp) / "checkpoints").mkdir()
        (Path(tmp) / "checkpoints" / "manifest.json").write_text(text)
        check_only_our_error(load_manifest, Path(tmp))


@pytest.mark.parametrize("text", ["name: [unclosed", "name: x\ntasks: 3\n", "- a\n- b\n",
                                  "name: x\ntasks:\n  - {name: t, data: \"a\\0b\", peft: {method: lora}}\n"])
def test_cli_reports_bad_config_without_traceback(tmp_path, capsys, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and "Traceback" not in err
