"""Training files as users bring them: the OpenAI chat fine-tuning format in full, ShareGPT, and files
beyond JSONL (JSON array, CSV, Parquet, a saved dataset): exact loss masks, identical tokens across
formats, one clear error per rule (file, line or row, field), nothing half-written."""

import json

import pytest
from format_samples import SUFFIX, WRITERS, openai_records, to_sharegpt, write_jsonl

from muxtune.errors import MuxTuneError
from muxtune.executor.backbone import BOS, EOS, ByteTokenizer
from muxtune.executor.data import IGNORE, DataOptions, inspect_file, load_examples

TOK = ByteTokenizer()


def expected(segments):
    """[bos] + the segments' bytes + [eos]; labels: a trained segment's bytes and the eos."""
    ids, labels = [BOS], [IGNORE]
    for text, trains in segments:
        ids += list(text.encode())
        labels += list(text.encode()) if trains else [IGNORE] * len(text.encode())
    return ids + [EOS], labels + [EOS]


def one(path, **options):
    examples, stats = load_examples(path, TOK, 4096, options=DataOptions(**options))
    assert len(examples) == 1
    return examples[0], stats


def test_openai_loss_mask_is_exact_weight_0_turns_and_tool_outputs_carry_none(tmp_path):
    record = {"messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Weather in Oslo?", "name": "ann"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3 C"},
        {"role": "assistant", "content": "Cold.", "weight": 0},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}, {"type": "text", "text": "!"}]},
        {"role": "assistant", "content": "Bye.", "weight": 1},
    ]}
    ex, stats = one(write_jsonl(tmp_path / "a.jsonl", [record]))
    ids, labels = expected([
        ("system: Be terse.\n", False), ("user (ann): Weather in Oslo?\n", False), ("assistant: ", False),
        ('<tool_call>{"arguments": {"city": "Oslo"}, "name": "weather"}</tool_call>\n', True),
        ("tool: 3 C\n", False), ("assistant: ", False), ("Cold.\n", False),  # weight 0
        ("user: Thanks!\n", False), ("assistant: ", False), ("Bye.\n", True)])
    assert ex.input_ids == ids and ex.labels == labels
    assert stats.format == "chat" and stats.source == "jsonl"
    assert stats.trainable_tokens == sum(label != IGNORE for label in labels[1:])


def test_tools_are_listed_first_and_carry_no_loss(tmp_path):
    tool = {"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}}
    record = {"messages": [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": "Noon."}],
              "tools": [tool]}
    ex, _ = one(write_jsonl(tmp_path / "t.jsonl", [record]))
    listing = 'tools: [{"function": {"name": "clock", "parameters": {"type": "object"}}, "type": "function"}]\n'
    assert (ex.input_ids, ex.labels) == expected([(listing, False), ("user: Time?\n", False),
                                                  ("assistant: ", False), ("Noon.\n", True)])


def test_legacy_function_call_and_function_role_read_as_a_tool_call_and_its_output(tmp_path):
    legacy = {"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}},
        {"role": "function", "name": "weather", "content": "3 C"},
        {"role": "assistant", "content": "Cold."}],
        "functions": [{"name": "weather", "parameters": {"type": "object"}}]}
    ex, _ = one(write_jsonl(tmp_path / "f.jsonl", [legacy]))
    listing = 'tools: [{"function": {"name": "weather", "parameters": {"type": "object"}}, "type": "function"}]\n'
    assert (ex.input_ids, ex.labels) == expected([
        (listing, False), ("user: Weather?\n", False), ("assistant: ", False),
        ('<tool_call>{"arguments": {"city": "Oslo"}, "name": "weather"}</tool_call>\n', True),
        ("tool (weather): 3 C\n", False), ("assistant: ", False), ("Cold.\n", True)])


def test_sharegpt_as_axolotl_and_llama_factory_write_it(tmp_path):
    axolotl = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                 {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Tool?"},
                                 {"from": "tool", "value": "42"}, {"from": "gpt", "value": "It says 42."}]}
    ex, stats = one(write_jsonl(tmp_path / "s.jsonl", [axolotl]))
    assert stats.format == "sharegpt"
    assert (ex.input_ids, ex.labels) == expected([
        ("system: Be kind.\n", False), ("user: Hi\n", False), ("assistant: ", False), ("Hello!\n", True),
        ("user: Tool?\n", False), ("tool: 42\n", False), ("assistant: ", False), ("It says 42.\n", True)])
    factory = {"conversations": [{"from": "human", "value": "Weather in Oslo?"},
                                 {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
                                 {"from": "observation", "value": "3 C"}, {"from": "gpt", "value": "Cold."}],
               "system": "Be terse.", "tools": '[{"name": "weather", "parameters": {"type": "object"}}]'}
    ex, _ = one(write_jsonl(tmp_path / "lf.jsonl", [factory]))
    listing = 'tools: [{"function": {"name": "weather", "parameters": {"type": "object"}}, "type": "function"}]\n'
    assert (ex.input_ids, ex.labels) == expected([
        (listing, False), ("system: Be terse.\n", False), ("user: Weather in Oslo?\n", False), ("assistant: ", False),
        ('<tool_call>{"arguments": {"city": "Oslo"}, "name": "weather"}</tool_call>\n', True),
        ("tool: 3 C\n", False), ("assistant: ", False), ("Cold.\n", True)])


def test_same_conversations_in_every_format_and_file_kind_give_identical_tokens_and_labels(tmp_path):
    records = openai_records(6)
    files = {}
    for kind, write in WRITERS.items():
        files[f"openai {kind}"] = write(tmp_path / f"openai{SUFFIX[kind]}" if kind != "dataset"
                                        else tmp_path / "openai_ds", records)
        files[f"sharegpt {kind}"] = write(tmp_path / f"sharegpt{SUFFIX[kind]}" if kind != "dataset"
                                          else tmp_path / "sharegpt_ds", [to_sharegpt(r) for r in records])
    results = {}
    for name, path in files.items():
        examples, stats = load_examples(path, TOK, 4096)
        assert (stats.format, stats.source) == (name.split()[0].replace("openai", "chat"), name.split()[1]), name
        results[name] = [(ex.input_ids, ex.labels) for ex in examples[:]]
    reference = results.pop("openai jsonl")
    assert len(reference) == 6 and any(label != IGNORE for label in reference[0][1][1:])
    for name, got in results.items():
        assert got == reference, name


def test_csv_prompt_completion_and_text_columns_and_a_json_array(tmp_path):
    (tmp_path / "pc.csv").write_text('prompt,completion\n"2+2=",4\n"say ""hi""",hi\n')
    examples, stats = load_examples(tmp_path / "pc.csv", TOK, 64)
    assert (stats.format, stats.source, len(examples)) == ("prompt_completion", "csv", 2)
    assert (examples[1].input_ids, examples[1].labels) == expected([('say "hi"', False), ("hi", True)])
    (tmp_path / "t.tsv").write_text("text\nall of it\n")
    examples, stats = load_examples(tmp_path / "t.tsv", TOK, 64)
    assert stats.format == "text" and examples[0].labels[1:] == examples[0].input_ids[1:]
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Add.", "output": "4"}]))
    examples, stats = load_examples(tmp_path / "a.json", TOK, 64)
    assert (stats.format, stats.source) == ("alpaca", "json")


def test_a_json_file_of_lines_and_a_file_without_extension_are_detected_by_content(tmp_path):
    write_jsonl(tmp_path / "lines.json", [{"text": "a"}, {"text": "b"}])
    assert load_examples(tmp_path / "lines.json", TOK, 64)[1].source == "jsonl"
    WRITERS["parquet"](tmp_path / "noext", [{"text": "a"}])
    assert load_examples(tmp_path / "noext", TOK, 64)[1].source == "parquet"


def test_data_format_still_forces_the_record_format_on_any_file_kind(tmp_path):
    path = WRITERS["parquet"](tmp_path / "d.parquet", [{"prompt": "a", "completion": "b", "text": "whole"}])
    ex, stats = one(path)
    assert stats.format == "prompt_completion"
    ex, stats = one(path, data_format="text")
    assert stats.format == "text" and ex.input_ids == expected([("whole", True)])[0]
    with pytest.raises(MuxTuneError, match=r"d.parquet: row 1: expected a sharegpt record"):
        one(path, data_format="sharegpt")


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def chat(*messages, **top):
    return json.dumps({"messages": list(messages), **top})


U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
CALL = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                             "function": {"name": "f", "arguments": "{}"}}]}


@pytest.mark.parametrize("line,message", [
    (chat(U, {**A, "weight": 0}), r"messages has no 'assistant' turn to train on \(every one has weight 0\)"),
    (chat(U), r"messages has no 'assistant' turn to train on"),
    (chat(U, {"role": "bot", "content": "x"}), r"messages\[1\] must be a message with a role in .*'role' is 'bot'"),
    (chat({"content": "x"}, A), r"messages\[0\] must be a message with a role in .*'role' is None"),
    (chat(U, {**A, "weight": 2}), r"messages\[1\] must be a valid assistant message: 'weight' must be 0 or 1, got 2"),
    (chat(U, {**A, "weight": True}), r"messages\[1\] .*'weight' must be 0 or 1, got True"),
    (chat({**U, "weight": 0}, A), r"messages\[0\] must be a valid user message: unknown key 'weight'"),
    (chat({"role": "user", "content": 3}, A), r"messages\[0\] must be a valid user message: 'content' must be a string"),
    (chat({"role": "user"}, A), r"messages\[0\] must be a valid user message: 'content' is missing"),
    (chat(U, {"role": "assistant"}), r"messages\[1\] must be a valid assistant message: 'content' is missing"),
    (chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, A),
     r"messages\[0\] .*'content\[0\]' must be a text part"),
    (chat({**U, "name": 5}, A), r"messages\[0\] must be a valid user message: 'name' must be a string"),
    (chat(U, CALL, {"role": "tool", "content": "r"}, A), r"messages\[2\] must be a valid tool message: 'tool_call_id'"),
    (chat(U, CALL, {"role": "tool", "tool_call_id": "zz", "content": "r"}, A),
     r"messages\[2\] .*'tool_call_id' 'zz' answers no earlier assistant tool call"),
    (chat(U, {"role": "assistant", "tool_calls": []}), r"messages\[1\] .*'tool_calls' must be a non-empty list"),
    (chat(U, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}),
     r"messages\[1\] .*'tool_calls\[0\].id' must be a string"),
    (chat(U, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"arguments": "{}"}}]}),
     r"messages\[1\] .*'tool_calls\[0\].function.name' must be a non-empty string"),
    (chat(U, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                   "function": {"name": "f", "arguments": "{oops"}}]}),
     r"messages\[1\] .*'tool_calls\[0\].function.arguments' must be a JSON-encoded object"),
    (chat(U, {"role": "assistant", "content": "a", "tool_calls": CALL["tool_calls"],
              "function_call": {"name": "f", "arguments": "{}"}}), r"messages\[1\] .*both 'tool_calls' and"),
    (chat(U, {"role": "function", "content": "r"}, A), r"messages\[1\] must be a valid function message: 'name'"),
    (chat(U, A, tools={"name": "f"}), r"'tools' must be a list of tools"),
    (chat(U, A, tools=[{"type": "function", "function": {"description": "no name"}}]),
     r"'tools\[0\]' must be a function definition with a 'name'"),
    (json.dumps({"conversations": [{"from": "robot", "value": "x"}]}),
     r"conversations\[0\] must be a turn with 'from' in .*'from' is 'robot'"),
    (json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": None}]}),
     r"conversations\[1\] must be a valid gpt turn: 'value' must be a string"),
    (json.dumps({"conversations": [{"from": "human", "value": "x"}]}), r"conversations has no 'assistant' turn"),
    (json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "f()"}]}),
     r"conversations\[1\] must be a valid function_call turn: 'value' must be a JSON call"),
])
def test_each_rule_violation_has_its_own_error_naming_file_line_and_field(tmp_path, line, message):
    good = json.dumps(GOOD) if "messages" in line else json.dumps(to_sharegpt(GOOD))
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good, good, line, good]) + "\n")
    with pytest.raises(MuxTuneError, match=f"d.jsonl:3: {message}"):
        load_examples(path, TOK, 256)
    examples, stats = load_examples(path, TOK, 256, options=DataOptions(on_bad_line="skip"))
    assert len(examples) == 3 and stats.skipped_bad_lines == 1 and stats.first_bad_line.startswith(f"{path}:3: ")


@pytest.mark.parametrize("kind,where", [("parquet", "d.parquet: row 3"), ("dataset", "d: row 3"),
                                        ("json", r"d.json: row 3 \(line \d+\)"), ("csv", r"d.csv: row 3 \(line 4\)")])
def test_errors_in_other_file_kinds_name_the_row_and_are_skipped_by_the_same_policy(tmp_path, kind, where):
    records = [GOOD, GOOD, {"messages": [U, {**A, "weight": 5}]}, GOOD]
    path = WRITERS[kind](tmp_path / f"d{SUFFIX[kind]}", records)
    cache = tmp_path / "cache"
    with pytest.raises(MuxTuneError, match=f"{where}: messages\\[1\\] .*'weight' must be 0 or 1, got 5"):
        load_examples(path, TOK, 256, cache_dir=cache)
    # nothing half-written: no cache entry, no staging folder
    assert not (cache / "data").exists() or not list((cache / "data").iterdir())
    examples, stats = load_examples(path, TOK, 256, options=DataOptions(on_bad_line="skip"), cache_dir=cache)
    assert (len(examples), stats.lines, stats.skipped_bad_lines, stats.source) == (3, 4, 1, kind)
    assert [p.name for p in (cache / "data").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("name,content,message", [
    ("broken.parquet", b"PAR1 not really", "not a readable Parquet file"),
    ("broken.json", b'[{"text": "a"}, {"text": ', r"row 2 \(line 1\): not valid JSON"),
    ("object.json", b'[{"text": "a"} {"text": "b"}]', r"line 1: expected ',' or '\]' after row 1"),
    ("cells.csv", b"text\na,b\n", r"row 1 \(line 2\): more cells than the header's 1 columns"),
    ("json_cell.csv", b'messages\n"[{oops"\n', r"row 1 \(line 2\): column 'messages' must hold JSON"),
    ("empty.csv", b"", "expected a header row"),
])
def test_unreadable_files_name_the_file_and_where(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MuxTuneError, match=f"{name}: {message}"):
        load_examples(tmp_path / name, TOK, 64, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "data").exists() or not list((tmp_path / "cache" / "data").iterdir())


def test_a_folder_that_is_not_a_saved_dataset_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.txt").write_text("hi")
    with pytest.raises(MuxTuneError, match="folder: a folder must be a dataset saved with datasets' save_to_disk"):
        load_examples(tmp_path / "folder", TOK, 64)


def test_a_saved_dataset_dict_reads_its_train_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"text": "train me"}]),
                 "test": Dataset.from_list([{"text": "not me"}])}).save_to_disk(str(tmp_path / "dd"))
    ex, stats = one(tmp_path / "dd")
    assert TOK.decode(ex.input_ids) == "train me" and stats.source == "dataset"


def test_inspect_file_reports_format_examples_trainable_tokens_drops_and_lengths(tmp_path):
    records = [{"prompt": "p" * 10, "completion": "c" * 4}, {"prompt": "p" * 40, "completion": "c" * 4},
               {"prompt": "no completion"}, {"prompt": "", "completion": "c" * 50}]
    path = WRITERS["parquet"](tmp_path / "r.parquet", records)
    report = inspect_file(path, TOK, 32, DataOptions(on_bad_line="skip", truncation="drop"))
    assert (report.source, report.format, report.records, report.examples) == ("parquet", "prompt_completion", 4, 1)
    assert report.trainable_tokens == 5 and report.tokens == 16  # bos + 10 + 4 + eos; 4 + eos trained
    assert report.dropped == {"bad record (on_bad_line: skip)": 1,
                              "longer than max_seq_len (truncation: drop)": 2}
    assert "row 3: missing 'completion'" in report.first_bad_record
    # bins of 4 tokens up to 32, then longer: 16 tokens, 46 and 52 tokens
    assert report.length_histogram[3] == (13, 16, 1) and report.length_histogram[-1] == (33, None, 2)
    assert sum(count for _, _, count in report.length_histogram) == 3
    text = report.text()
    assert "parquet file, prompt_completion format" in text and "dropped 2: longer than max_seq_len" in text
    assert "> 32 |" in text and "first bad record:" in text


def local_hf_tokenizer(tmp_path, template):
    """A real (local, byte-level BPE) HF tokenizer with the given chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from muxtune.executor.backbone import HFTokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["weather in Oslo, cold and wet"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / f"tok{abs(hash(template))}"
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                            chat_template=template).save_pretrained(folder)
    return HFTokenizer(str(folder))


TOOL_RECORD = {"messages": [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "3 C"},
    {"role": "assistant", "content": "Cold.", "weight": 0},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "Bye."}],
    "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}


@pytest.mark.parametrize("supports_tools", [True, False])
def test_a_real_chat_template_renders_tools_and_trains_only_weight_1_assistant_turns(tmp_path, supports_tools):
    turns = ("{% for m in messages %}[{{ m['role'] }}] {% for c in m.get('tool_calls') or [] %}<call>"
             "{{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}</call>{% endfor %}"
             "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    tools = "{% if tools %}[tools] {% for t in tools %}{{ t['function']['name'] }};{% endfor %}{{ '\\n' }}{% endif %}"
    tok = local_hf_tokenizer(tmp_path, (tools if supports_tools else "") + turns)
    examples, stats = load_examples(write_jsonl(tmp_path / "c.jsonl", [TOOL_RECORD]), tok, 4096)
    ex = examples[0]
    listing = ("[tools] weather;\n" if supports_tools else
               '[system] tools: [{"function": {"name": "weather", "parameters": {"type": "object"}}, '
               '"type": "function"}]\n')
    assert tok.decode(ex.input_ids[1:-1]) == (
        listing + '[user] Weather in Oslo?\n[assistant] <call>weather {"city": "Oslo"}</call>\n'
        "[tool] 3 C\n[assistant] Cold.\n[user] Thanks\n[assistant] Bye.\n")
    trained = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE and t != tok.eos_token_id])
    # a token that straddles a turn's start belongs to the turn; the tool output and weight-0 turn never train
    assert '<call>weather {"city": "Oslo"}</call>' in trained and "Bye." in trained
    assert "3 C" not in trained and "Cold" not in trained and "Thanks" not in trained and "weather;" not in trained


def test_a_chat_template_that_refuses_a_conversation_is_a_clear_error(tmp_path):
    tok = local_hf_tokenizer(tmp_path, "{% for m in messages %}{% if m['role'] == 'tool' %}"
                                       "{{ raise_exception('no tool role here') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(MuxTuneError, match=r"c.jsonl:1: the model's chat template cannot render this conversation: "
                                           "no tool role here"):
        load_examples(write_jsonl(tmp_path / "c.jsonl", [TOOL_RECORD]), tok, 4096)


def test_the_histogram_bins_cover_each_length_exactly_once():
    from muxtune.executor.data import HISTOGRAM_BINS, DataStats, FileReport, _length_bin

    for max_seq_len in (4, 5, 7, 8, 31, 100, 257, 4096):
        bins = FileReport.of("f", DataStats(), max_seq_len).length_histogram
        assert len(bins) == HISTOGRAM_BINS + 1 and bins[-1][:2] == (max_seq_len + 1, None)
        for length in range(1, max_seq_len + 2):
            lo, hi, _ = bins[_length_bin(length, max_seq_len)]
            assert lo <= length and (hi is None or length <= hi), (max_seq_len, length)
        assert bins[0][0] == 1 and all(bins[k][1] + 1 == bins[k + 1][0] for k in range(HISTOGRAM_BINS - 1))
