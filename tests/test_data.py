"""Dataset sources, instruction formats, prepare_data and variant datasets on the real shared data."""
from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest

from nacd.config import DataConfig, DataSourceConfig, RunConfig, SourceModelConfig
from nacd.data.formats import (InstructionExample, mix, render_prompt, render_row, to_instructions)
from nacd.data.prepare import load_mixture, prepare_data, read_prepared
from nacd.data.sources import DataSourceError, load_records, read_file
from nacd.data.tokenization import IGNORE_INDEX, ensure_pad_token, tokenize_example
from nacd.data.variants import VariantError, full_variant, read_variant, read_variant_meta, write_variant
from nacd.models import load_tokenizer

FLAN_ROWS = {"aqua": 2728, "creak": 6915, "ecqa": 7112, "gsm8k": 7473, "qasc": 1084,
             "sensemaking": 6070, "strategyqa": 2061}


# --------------------------------------------------------------------------- loaders
@pytest.mark.parametrize("name,count", [("lima", 1030), ("dolly_open_qa", 3742)])
def test_instruction_sets_have_documented_counts(shared_data, name, count):
    examples = to_instructions(load_records(name, "train", shared_data), "auto", name)
    assert len(examples) == count
    assert all(ex.instruction and ex.response for ex in examples)
    assert len({ex.id for ex in examples}) == count


def test_lima_multi_turn_keeps_history_as_context(shared_data):
    rows = load_records("lima", "train", shared_data)
    multi = [(r, ex) for r, ex in zip(rows, to_instructions(rows, "messages", "lima"))
             if len(r["conversations"]) > 2]
    assert len(multi) == 30  # SOURCES.md: 30 multi-turn dialogues
    row, ex = multi[0]
    conv = row["conversations"]
    assert ex.response == conv[-1].strip() and ex.instruction == conv[-2].strip()
    assert ex.context.startswith("User: " + conv[0][:20])


def test_flan_cot_rows_per_file(shared_data):
    rows = load_records("flan_v2_cot", "train", shared_data)
    per_task: dict[str, int] = {}
    for r in rows:
        per_task[r["task"]] = per_task.get(r["task"], 0) + 1
    assert per_task == FLAN_ROWS
    ex = to_instructions(rows[:1], "auto", "flan_v2_cot")[0]
    assert ex.response.endswith(f"So the answer is {rows[0]['answer']}.")
    assert "\\n" not in ex.instruction  # escaped newlines became real ones


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(DataSourceError, match=r"bad\.jsonl:2: not valid JSON"):
        read_file(path)


def test_malformed_headerless_csv_names_line(tmp_path):
    folder = tmp_path / "mmlu" / "val"
    folder.mkdir(parents=True)
    (folder / "anatomy_val.csv").write_text('q1,a,b,c,d,A\n"multi\nline q",a,b,c,D\n')
    with pytest.raises(DataSourceError, match=r"anatomy_val\.csv:2: expected 6 fields"):
        load_records("mmlu", "val", tmp_path)


def test_file_formats_round_trip(tmp_path):
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "a.csv").write_text("instruction,input,output\n" + "".join(f"i{k},,o{k}\n" for k in range(3)))
    (tmp_path / "a.tsv").write_text("instruction\tinput\toutput\n" + "".join(f"i{k}\t\to{k}\n" for k in range(3)))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    for suffix in ("jsonl", "json", "csv", "tsv", "parquet"):
        got = to_instructions(read_file(tmp_path / f"a.{suffix}"), "auto", "mine")
        assert [(e.instruction, e.response) for e in got] == [(f"i{k}", f"o{k}") for k in range(3)], suffix


def test_sharegpt_and_messages_formats():
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]}]
    got = [to_instructions([r], "auto", "chat")[0] for r in rows]
    assert [(e.instruction, e.response, e.context) for e in got] == [("hi", "hello", ""), ("q", "a", "")]
    with pytest.raises(DataSourceError, match="chat row 1: the conversation has no user turn"):
        to_instructions([{"messages": [{"role": "user", "content": "only"}]}], "messages", "chat")


def test_missing_builtin_names_expected_file(tmp_path):
    with pytest.raises(DataSourceError, match=str(tmp_path / "lima" / "train.jsonl")):
        load_records("lima", "train", tmp_path)
    with pytest.raises(DataSourceError, match=r"no data_dir given.*<data_dir>/dolly_open_qa/train\.jsonl"):
        load_records("dolly_open_qa", "train", None)
    with pytest.raises(DataSourceError, match="data file or folder not found"):
        load_records("./nope.jsonl")


def test_s3_source(s3_bucket, tmp_path, monkeypatch):
    import boto3

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    body = "".join(json.dumps({"instruction": f"q{k}", "response": f"r{k}"}) + "\n" for k in range(4))
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key="d/train.jsonl", Body=body.encode())
    rows = load_records(f"s3://{bucket}/d/train.jsonl")
    assert [r["response"] for r in rows] == ["r0", "r1", "r2", "r3"]
    assert len(load_records(f"s3://{bucket}/d", "train")) == 4
    # a bad row is named by its URI and line, not by the temp copy it was read from
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key="e/bad.jsonl",
                                                         Body=b'{"instruction": "q"}\n')
    with pytest.raises(DataSourceError, match=rf"^s3://{bucket}/e/bad\.jsonl:1: field 'response' is missing"):
        to_instructions(load_records(f"s3://{bucket}/e/bad.jsonl"), "dolly", "bad")


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_non_utf8_file_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"latin1.{suffix}"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n"\xff\xfe"\n')  # Latin-1 bytes on line 2
    with pytest.raises(DataSourceError, match=rf"^{re.escape(str(path))}:2: not UTF-8 text \(byte 0xff"):
        load_records(str(path))


def test_row_errors_name_file_and_line(tmp_path):
    jsonl = tmp_path / "missing.jsonl"
    jsonl.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n')
    with pytest.raises(DataSourceError, match=rf"^{re.escape(str(jsonl))}:3: field 'output' is missing$"):
        to_instructions(load_records(str(jsonl)), "auto", "missing")
    csv_path = tmp_path / "blank.csv"  # a quoted line break: the error names the line the record starts on
    csv_path.write_text('instruction,output\n"two\nlines",b\nc,\n')
    with pytest.raises(DataSourceError, match=rf"^{re.escape(str(csv_path))}:4: field 'output' is empty$"):
        to_instructions(load_records(str(csv_path)), "alpaca", "blank")
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": " "}]
                               ).to_parquet(str(parquet))
    with pytest.raises(DataSourceError, match=rf"^{re.escape(str(parquet))} row 2: field 'output' is empty$"):
        to_instructions(load_records(str(parquet)), "alpaca", "rows")


@pytest.mark.parametrize("row,field", [
    ({"instruction": ["a"], "output": {"x": 1}}, "field 'instruction' must be text or a number, got list"),
    ({"instruction": "a", "input": True, "output": "b"}, "field 'input' must be text or a number, got bool"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                   {"role": "assistant", "content": "a"}]}, "turn 0's content must be a string, got list")])
def test_text_fields_must_be_text(tmp_path, row, field):
    path = tmp_path / "wrongtype.jsonl"
    path.write_text("\n" + json.dumps(row) + "\n")  # the row is on line 2: blank lines count
    with pytest.raises(DataSourceError, match=rf"^{re.escape(str(path))}:2: {field}"):
        to_instructions(load_records(str(path)), "auto", "wrongtype")


def test_a_numeric_answer_is_text(tmp_path):
    """A numeric column (gsm8k's answers once pandas or Parquet has read them) is its text."""
    path = tmp_path / "flan.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "answer": 4, "rationale": "2 and 2 make 4."}) + "\n"
                    + json.dumps({"instruction": "Half of 3?", "output": 1.5}) + "\n")
    flan = to_instructions(load_records(str(path))[:1], "flan_cot", "flan")
    alpaca = to_instructions(load_records(str(path))[1:], "alpaca", "alpaca")
    assert flan[0].response == "2 and 2 make 4. So the answer is 4." and alpaca[0].response == "1.5"


def test_empty_source_is_an_error_naming_it(tmp_path):
    good, empty = tmp_path / "good.jsonl", tmp_path / "headeronly.csv"
    good.write_text('{"instruction": "a", "output": "b"}\n')
    empty.write_text("instruction,output\n")
    for sources in ([str(good), str(empty)], [str(empty)]):
        cfg = DataConfig(sources=[DataSourceConfig(name=name, split="train") for name in sources])
        with pytest.raises(DataSourceError, match=rf"^source '{re.escape(str(empty))}' \(split 'train'\) has no rows$"):
            load_mixture(cfg)
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "validation.jsonl").write_text("\n")
    cfg = DataConfig(sources=[DataSourceConfig(name="arc_easy", split="validation")], data_dir=str(tmp_path))
    with pytest.raises(DataSourceError, match=rf"source 'arc_easy' \(split 'validation' in data_dir {re.escape(str(tmp_path))}\)"):
        load_mixture(cfg)


# --------------------------------------------------------------------------- formats
def test_mixture_weights_and_errors():
    a = [InstructionExample(f"a{k}", "a", "i", "r") for k in range(10)]
    b = [InstructionExample(f"b{k}", "b", "i", "r") for k in range(10)]
    out = mix([(a, 0.5), (b, 2.3)], seed=1)
    assert sum(e.source == "a" for e in out) == 5 and sum(e.source == "b" for e in out) == 23
    assert out == mix([(a, 0.5), (b, 2.3)], seed=1)  # seeded
    assert out != mix([(a, 0.5), (b, 2.3)], seed=2)
    with pytest.raises(DataSourceError, match="mixture is empty"):
        mix([])
    with pytest.raises(ValueError, match="data.sources is empty"):
        DataConfig(sources=[])


def test_plain_and_chat_rendering():
    ex = InstructionExample("x", "s", "Do it.", "Done.", context="ctx")
    assert render_prompt(ex) == "### Instruction:\nDo it.\n\n### Input:\nctx\n\n### Response:\n"
    row = render_row(ex)
    assert row["text"] == row["prompt"] + "Done."
    tok = load_tokenizer("tiny-llama")
    chat = render_prompt(ex, "chat", tok)
    assert "Do it.\n\nctx" in chat and chat.rstrip().endswith("assistant")
    with pytest.raises(ValueError, match="unknown template"):
        render_prompt(ex, "fancy")


# --------------------------------------------------------------------------- tokenisation
def test_prompt_masked_and_length_policy():
    tok = load_tokenizer("tiny-llama")
    prompt, response = "### Instruction:\nSay hi.\n\n### Response:\n", "hi there " * 20
    full = tokenize_example(tok, prompt, response, 512)
    n_prompt = len(tok(prompt)["input_ids"])
    assert full.status == "kept" and full.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert full.labels[n_prompt:] == full.input_ids[n_prompt:] and full.input_ids[-1] == tok.eos_token_id
    assert tokenize_example(tok, prompt, response, 20, "drop").status == "dropped"
    cut = tokenize_example(tok, prompt, response, 20, "truncate")
    assert cut.status == "truncated" and cut.input_ids == full.input_ids[:20]
    # a prompt that alone fills max_length leaves nothing to learn: dropped even when truncating
    assert tokenize_example(tok, prompt * 5, response, 20, "truncate").status == "dropped"


def test_tokenizer_without_pad_token_gets_eos():
    tok = load_tokenizer("tiny-llama")
    tok.pad_token = None
    assert ensure_pad_token(tok).pad_token_id == tok.eos_token_id
    tok.pad_token = None
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an EOS"):
        ensure_pad_token(tok, "mytok")


# --------------------------------------------------------------------------- prepare + variants
def _cfg(shared_data, **data) -> RunConfig:
    sources = [DataSourceConfig(name="dolly_open_qa", max_rows=30),
               DataSourceConfig(name="lima", max_rows=10, weight=2.0),
               DataSourceConfig(name="arc_easy", max_rows=10)]
    return RunConfig(source=SourceModelConfig(name="tiny-llama"),
                     data=DataConfig(sources=sources, data_dir=str(shared_data), **data))


def test_prepare_data_writes_contract(shared_data, tmp_path):
    cfg = _cfg(shared_data, max_length=128, overflow="drop")
    summary = prepare_data(cfg, tmp_path / "ds")
    info = read_prepared(tmp_path / "ds")
    ds = datasets.load_from_disk(str(tmp_path / "ds" / "hf"))
    assert set(ds.column_names) >= {"input_ids", "labels", "attention_mask", "prompt", "response", "source", "id"}
    counts = info["counts"]
    assert counts["lima"]["kept"] + counts["lima"]["dropped"] == 20  # weight 2 doubles 10 rows
    assert counts["lima"]["dropped"] > 0  # LIMA answers are long: max_length 128 drops some
    assert len(ds) == summary["rows"] == sum(c["kept"] + c["truncated"] for c in counts.values())
    assert len(set(ds["id"])) == len(ds)
    row = ds[0]
    assert max(len(r) for r in ds["input_ids"]) <= 128
    assert row["labels"][0] == IGNORE_INDEX and row["labels"][-1] == row["input_ids"][-1]
    # same config -> reused, same fingerprint; another template -> another fingerprint
    assert prepare_data(cfg, tmp_path / "ds")["reused"] is True
    other = prepare_data(_cfg(shared_data, max_length=128, template="chat"), tmp_path / "ds2")
    assert other["fingerprint"] != info["fingerprint"]
    trunc = prepare_data(_cfg(shared_data, max_length=128, overflow="truncate"), tmp_path / "ds3")
    assert trunc["counts"]["lima"]["truncated"] > 0 and trunc["rows"] > summary["rows"]


def test_corrupt_prepare_json_is_rebuilt(tmp_path):
    """A prepare.json left corrupt (a crash, a hand edit) must not block re-running the step;
    readers of the dataset get an error naming the file."""
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    cfg = RunConfig(source=SourceModelConfig(name="tiny-llama"),
                    data=DataConfig(sources=[DataSourceConfig(name=str(tmp_path / "d.jsonl"))], max_length=64))
    out = tmp_path / "ds"
    (out / "hf").mkdir(parents=True)
    (out / "prepare.json").write_text("{bad")
    with pytest.raises(DataSourceError, match=rf"^{re.escape(str(out / 'prepare.json'))}: not valid JSON"):
        read_prepared(out)
    summary = prepare_data(cfg, out)
    assert "reused" not in summary and summary["rows"] == 1
    assert read_prepared(out)["summary"] == summary
    assert prepare_data(cfg, out)["reused"] is True


def test_pool_size_subsample_is_seeded(shared_data):
    cfg = _cfg(shared_data, pool_size=15, seed=3).data
    first = [e.id for e in load_mixture(cfg)]
    assert len(first) == 15 and first == [e.id for e in load_mixture(cfg)]


def test_variant_write_read_full(shared_data, tmp_path):
    prepare_data(_cfg(shared_data, max_length=128), tmp_path / "ds")
    info = full_variant(tmp_path / "ds", tmp_path / "full")
    rows = read_variant(tmp_path / "full")
    assert info["rows"] == len(rows) == len(datasets.load_from_disk(str(tmp_path / "full" / "hf")))
    assert read_variant_meta(tmp_path / "full")["variant"] == "full"
    assert all(r["text"] == r["prompt"] + r["response"] for r in rows)
    with pytest.raises(VariantError, match="lacks field"):
        write_variant([{"id": 1, "prompt": "p"}], tmp_path / "bad", {"variant": "x"})
    assert not (tmp_path / "bad").exists()  # nothing half-written
    with pytest.raises(VariantError, match="duplicate id"):
        write_variant([{"id": 1, "prompt": "p", "response": "r"}] * 2, tmp_path / "bad", {"variant": "x"})
    assert [p.name for p in Path(tmp_path).iterdir() if p.name.startswith(".")] == []
