"""Training files as users bring them, written to each format's public description: the same small
conversations as OpenAI chat fine-tuning JSONL, ShareGPT (LLaMA-Factory's function_call/observation
turns, tools as a JSON string), and either of them as Parquet, a JSON array, CSV or a saved dataset."""

import csv
import json

WEATHER_TOOL = {"type": "function", "function": {
    "name": "weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK_TOOL = {"type": "function", "function": {
    "name": "clock", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}


def openai_records(n: int = 6) -> list[dict]:
    """Conversations in the OpenAI chat fine-tuning format: system, tools, tool calls and outputs,
    several turns (every assistant turn trainable, so ShareGPT can say the same)."""
    records = []
    for i in range(n):
        city = ["Oslo", "Lima", "Pune"][i % 3]
        if i % 2 == 0:
            records.append({"messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Weather in {city}?"},
                {"role": "assistant", "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {
                    "name": "weather", "arguments": json.dumps({"city": city})}}]},
                {"role": "tool", "tool_call_id": f"call_{i}", "content": f"{i} C, rain"},
                {"role": "assistant", "content": f"{i} degrees and wet in {city}."},
            ], "tools": [WEATHER_TOOL, CLOCK_TOOL]})
        else:
            records.append({"messages": [
                {"role": "user", "content": f"Say hi to {city} {i}."},
                {"role": "assistant", "content": f"Hi {city}!"},
                {"role": "user", "content": "And bye?"},
                {"role": "assistant", "content": "Bye " * (i + 1)},
            ]})
    return records


SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}


def to_sharegpt(record: dict) -> dict:
    """The same conversation as LLaMA-Factory's ShareGPT: top-level `system`, tools as a JSON string
    of function definitions, a tool call as a `function_call` turn whose value is the JSON call."""
    out, turns = {}, []
    for m in record["messages"]:
        if m["role"] == "system":
            out["system"] = m["content"]
        elif m.get("tool_calls"):
            (call,) = m["tool_calls"]
            turns.append({"from": "function_call", "value": json.dumps(
                {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])})})
        else:
            turns.append({"from": SHAREGPT_FROM[m["role"]], "value": m["content"]})
    out["conversations"] = turns
    if "tools" in record:
        out["tools"] = json.dumps([t["function"] for t in record["tools"]])
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_json_array(path, records):
    path.write_text(json.dumps(records, indent=2))
    return path


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_saved_dataset(path, records):
    from datasets import Dataset

    Dataset.from_list(records).save_to_disk(str(path))
    return path


def write_csv(path, records):
    """Structured columns (messages, conversations, tools) as JSON text, as CSV can only hold text."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for r in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return path


WRITERS = {"jsonl": write_jsonl, "json": write_json_array, "parquet": write_parquet, "csv": write_csv,
           "dataset": write_saved_dataset}
SUFFIX = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet", "csv": ".csv", "dataset": ""}
