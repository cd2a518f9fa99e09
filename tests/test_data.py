"""Data ingestion: the common fine-tuning formats, loss masks, bad lines, over-long sequences, the cache."""

import json

import pytest

from muxtune.errors import MuxTuneError
from muxtune.executor import data as data_module
from muxtune.executor.backbone import BOS, EOS, ByteTokenizer
from muxtune.executor.data import IGNORE, DataOptions, load_examples

TOK = ByteTokenizer()


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def trained_text(example) -> str:
    """The bytes that carry loss (eos dropped)."""
    return TOK.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE and t != EOS])


def test_each_format_is_detected_and_trains_on_its_target_only(tmp_path):
    cases = {
        "chat": ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                               {"role": "assistant", "content": "Bye."}]}, "Hello.\nBye.\n"),
        "prompt_completion": ({"prompt": "2+2=", "completion": "4"}, "4"),
        "alpaca": ({"instruction": "Add.", "input": "2 and 2", "output": "4"}, "4"),
        "text": ({"text": "all of it"}, "all of it"),
    }
    for fmt, (record, target) in cases.items():
        examples, stats = load_examples(write(tmp_path / f"{fmt}.jsonl", [record]), TOK, 256)
        assert stats.format == fmt and len(examples) == 1
        ex = examples[0]
        assert ex.input_ids[0] == BOS and ex.input_ids[-1] == EOS and ex.labels[-1] == EOS
        assert trained_text(ex) == target, fmt
        if fmt == "alpaca":
            assert "### Input:\n2 and 2" in TOK.decode(ex.input_ids)
        # loss_on: all trains on every token after bos
        every, _ = load_examples(tmp_path / f"{fmt}.jsonl", TOK, 256, options=DataOptions(loss_on="all"))
        assert every[0].labels[1:] == every[0].input_ids[1:]


def test_format_can_be_forced_and_a_mismatch_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "c"}])
    with pytest.raises(MuxTuneError, match=r"d.jsonl:2: expected a prompt_completion record"):
        load_examples(path, TOK, 64)
    with pytest.raises(MuxTuneError, match=r"d.jsonl:1: expected a text record"):
        load_examples(path, TOK, 64, options=DataOptions(data_format="text"))


@pytest.mark.parametrize("line,message", [
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "messages has no 'assistant' turn"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"messages\[0\] must be"),
    ('{"messages": [{"role": "assistant", "content": 3}]}', r"messages\[0\] must be"),
    ("not json", "not valid JSON"),
])
def test_bad_chat_lines_name_file_and_line_or_are_skipped_and_counted(tmp_path, line, message):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write(tmp_path / "chat.jsonl", [good, good, line, good])
    with pytest.raises(MuxTuneError, match=f"chat.jsonl:3: {message}"):
        load_examples(path, TOK, 64)
    examples, stats = load_examples(path, TOK, 64, options=DataOptions(on_bad_line="skip"))
    assert len(examples) == 3 and stats.skipped_bad_lines == 1 and stats.lines == 4
    assert "chat.jsonl:3" in stats.first_bad_line


def test_non_utf8_line_names_its_line(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(MuxTuneError, match=r"b.jsonl:2: not UTF-8"):
        load_examples(path, TOK, 64)


def test_long_sequences_are_truncated_or_dropped_and_counted(tmp_path):
    records = [{"prompt": "p" * 50, "completion": "c" * 5}, {"prompt": "short", "completion": "ok"},
               {"text": "t" * 80}]
    path = write(tmp_path / "long.jsonl", records[:2])
    examples, stats = load_examples(path, TOK, 32)
    assert stats.truncated == 1 and len(examples) == 2
    ex = examples[0]
    # the oldest prompt tokens go first: bos, the prompt's tail, the whole completion, eos
    assert len(ex.input_ids) == 32 and ex.input_ids[0] == BOS and trained_text(ex) == "ccccc"
    examples, stats = load_examples(path, TOK, 32, options=DataOptions(truncation="drop"))
    assert stats.dropped_too_long == 1 and stats.truncated == 0 and len(examples) == 1
    text = write(tmp_path / "text.jsonl", records[2:] + [{"text": "fits"}])
    examples, stats = load_examples(text, TOK, 32)
    assert stats.truncated == 1 and len(examples[0].input_ids) == 32  # text: keep the start
    with pytest.raises(MuxTuneError, match="no usable examples"):
        load_examples(write(tmp_path / "none.jsonl", records[2:]), TOK, 32, options=DataOptions(truncation="drop"))


def test_tokenized_data_is_cached_by_content_and_settings(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = write(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(20)])
    first, stats = load_examples(path, TOK, 64, cache_dir=cache)
    entries = list((cache / "data").iterdir())
    assert len(entries) == 1 and (entries[0] / "data.arrow").is_file()

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("re-tokenized a cached file")

    with monkeypatch.context() as patch:
        patch.setattr(data_module, "_read_examples", no_tokenizing)
        again, again_stats = load_examples(path, TOK, 64, cache_dir=cache)  # from the cache
    assert again_stats == stats and [again[i] for i in range(20)] == [first[i] for i in range(20)]
    # the examples are memory-mapped Arrow, not a Python list
    assert again.dataset.cache_files and not isinstance(again, list)
    # other settings or other content: a new entry
    load_examples(path, TOK, 64, cache_dir=cache, options=DataOptions(loss_on="all"))
    write(path, [{"prompt": "changed", "completion": "a"}])
    changed, _ = load_examples(path, TOK, 64, cache_dir=cache)
    assert len(changed) == 1 and len(list((cache / "data").iterdir())) == 3


def test_task_spec_keys_reach_the_loader_and_old_configs_stay_valid(tmp_path):
    from muxtune.spec import TaskSpec

    old = TaskSpec(name="t", data="d.jsonl", peft={"method": "lora"}, steps=50)  # no data keys: the defaults
    assert DataOptions.of(old) == DataOptions()
    new = TaskSpec(name="t", data="d.jsonl", peft={"method": "lora"}, steps=50, data_format="chat", on_bad_line="skip",
                   truncation="drop", loss_on="all")
    assert DataOptions.of(new) == DataOptions("chat", "skip", "drop", "all")
    with pytest.raises(Exception, match="on_bad_line"):
        TaskSpec(name="t", data="d.jsonl", peft={"method": "lora"}, steps=50, on_bad_line="ignore")


def test_shipped_data_sets_have_different_length_profiles(repo):
    lengths = {}
    for name in ("sentiment", "qa", "summarization", "chat"):
        examples, stats = load_examples(repo / "examples" / "data" / f"{name}.jsonl", TOK, 100_000)
        lengths[name] = sorted(examples.lengths)
    median = {k: v[len(v) // 2] for k, v in lengths.items()}
    assert median["sentiment"] < median["qa"] < median["summarization"]
    chat = lengths["chat"]
    assert chat[-1] > 3 * chat[len(chat) // 2]  # long-tailed
    assert sum(p.stat().st_size for p in (repo / "examples" / "data").glob("*.jsonl")) < 1_000_000


def test_chat_uses_a_real_tokenizers_chat_template(tmp_path):
    """A real (local, byte-level) HF tokenizer with a chat template: the template renders the
    conversation and only the assistant turns' tokens carry loss."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from muxtune.executor.backbone import HFTokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["hello there"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                            chat_template=template).save_pretrained(tmp_path / "tok")
    tok = HFTokenizer(str(tmp_path / "tok"))
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "more"}, {"role": "assistant", "content": "there"}]}
    examples, stats = load_examples(write(tmp_path / "c.jsonl", [record]), tok, 256)
    ex = examples[0]
    assert stats.format == "chat"
    assert tok.decode(ex.input_ids[1:-1]) == "[user] hi\n[assistant] hello\n[user] more\n[assistant] there\n"
    trained = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE and t != tok.eos_token_id]
    # a token that straddles a turn's start (BPE's " there") belongs to the turn
    assert tok.decode(trained).split() == ["hello", "there"]


def test_a_cache_entry_another_process_put_in_place_is_kept(tmp_path):
    """Processes of one job tokenize the same file at once: the later one must not delete the entry
    the earlier one put in place (a reader may be opening it), and leaves no staging folder behind."""
    from muxtune.spec import staged_directory

    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "data.arrow").write_text("first")
    with staged_directory(entry, keep_existing=True) as staging:
        (staging / "data.arrow").write_text("second")
    assert (entry / "data.arrow").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
