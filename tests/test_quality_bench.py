"""bench/quality.py's own logic: stage reuse under config records, row labels, the paired test."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import bench_module

from nacd.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    return bench_module("quality.py", "quality_bench")


@pytest.fixture(scope="module")
def expert_quality():
    return bench_module("expert_quality.py", "expert_quality_bench")


@pytest.fixture(scope="module")
def match_eval():
    return bench_module("match_eval.py", "match_eval_bench")


@pytest.fixture(scope="module")
def gpu_bundle():
    return bench_module("gpu_bundle.py", "gpu_bundle_bench")


def _plan(quality, work: Path, adopt: bool = False):
    return quality.Plan(scale="small", settings=["A"], budgets=[0.05], seeds=[0], targets=["t"], ablations=[],
                        out=work, work=work, data_dir=None, adopt_unrecorded=adopt)


def _stage(marker: Path, calls: list[int]):
    def run():
        calls.append(1)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{}")
    return run


def test_once_reuses_only_under_the_recorded_key(quality, tmp_path):
    plan, marker, calls = _plan(quality, tmp_path), tmp_path / "A" / "stage" / "done.json", []
    quality.once(plan, marker, _stage(marker, calls), "stage", {"distill": {"beta": 0.1}})
    assert calls == [1]
    assert quality.once(plan, marker, _stage(marker, calls), "stage", {"distill": {"beta": 0.1}}) == 0.0
    assert calls == [1]  # reused
    with pytest.raises(quality.StaleWork, match=r"distill\.beta: 0\.1 -> 10"):
        quality.once(plan, marker, _stage(marker, calls), "stage", {"distill": {"beta": 10}})
    assert calls == [1]  # a mismatch never reruns over the old output either


def test_a_stage_hands_its_cached_gpu_memory_back_and_logs_its_peak(quality, tmp_path, monkeypatch, capsys):
    import torch

    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty"))
    plan, marker = _plan(quality, tmp_path), tmp_path / "A" / "stage" / "done.json"
    stage = _stage(marker, [])
    quality.once(plan, marker, lambda: (events.append("run"), stage()), "distill", {"k": 1})
    assert events == ["reset", "run", "empty"]  # the next stage, or unit, starts from an empty cache
    assert "[quality] distill: 0 s, device peak 3.0 GiB" in capsys.readouterr().out
    quality.once(plan, marker, stage, "distill", {"k": 1})  # reused: nothing ran, nothing to hand back
    assert events == ["reset", "run", "empty"]


def test_a_record_from_before_an_added_field_means_its_neutral_value(quality, tmp_path):
    plan, marker, calls = _plan(quality, tmp_path), tmp_path / "A" / "stage" / "done.json", []
    quality.once(plan, marker, _stage(marker, calls), "stage", {"distill": {"beta": 0.1}})  # no min_start
    assert quality.once(plan, marker, _stage(marker, calls), "stage",
                        {"distill": {"beta": 0.1, "min_start": 0}}) == 0.0 and calls == [1]
    with pytest.raises(quality.StaleWork, match=r"distill\.min_start: 0 -> 30"):
        quality.once(plan, marker, _stage(marker, calls), "stage", {"distill": {"beta": 0.1, "min_start": 30}})
    # a key without the field's section gains nothing
    assert quality.with_added_fields({"experts": {"lr": 0.05}}) == {"experts": {"lr": 0.05}}
    # a key of dotted parts gains the field beside its section's others
    eval_marker = tmp_path / "A" / "eval" / "scores.json"
    quality.once(plan, eval_marker, _stage(eval_marker, calls), "eval", {"evaluation.batch_size": 8, "target": "t"})
    assert quality.once(plan, eval_marker, _stage(eval_marker, calls), "eval",
                        {"evaluation.batch_size": 8, "evaluation.max_logits_gib": 2.0, "target": "t"}) == 0.0
    with pytest.raises(quality.StaleWork, match=r"evaluation\.max_logits_gib: 2\.0 -> 0\.5"):
        quality.once(plan, eval_marker, _stage(eval_marker, calls), "eval",
                     {"evaluation.batch_size": 8, "evaluation.max_logits_gib": 0.5, "target": "t"})
    # a scoring recorded before evaluation.method was the harness's, never nacd's direct scorer
    assert quality.once(plan, eval_marker, _stage(eval_marker, calls), "eval",
                        {"evaluation.batch_size": 8, "evaluation.method": "lm_eval", "target": "t"}) == 0.0
    with pytest.raises(quality.StaleWork, match=r"evaluation\.method: 'lm_eval' -> 'direct'"):
        quality.once(plan, eval_marker, _stage(eval_marker, calls), "eval",
                     {"evaluation.batch_size": 8, "evaluation.method": "direct", "target": "t"})
    assert calls == [1, 1]


def test_once_refuses_unrecorded_output_unless_adopted(quality, tmp_path):
    marker, calls = tmp_path / "A" / "old" / "done.json", []
    _stage(marker, calls)()  # a stage from before records existed
    with pytest.raises(quality.StaleWork, match="no config record"):
        quality.once(_plan(quality, tmp_path), marker, _stage(marker, calls), "old", {"k": 1})
    assert quality.once(_plan(quality, tmp_path, adopt=True), marker, _stage(marker, calls), "old", {"k": 1}) == 0.0
    assert calls == [1]
    # adopted: recorded now, so a later run without the flag reuses it and a changed key is refused
    quality.once(_plan(quality, tmp_path), marker, _stage(marker, calls), "old", {"k": 1})
    with pytest.raises(quality.StaleWork):
        quality.once(_plan(quality, tmp_path), marker, _stage(marker, calls), "old", {"k": 2})


def test_once_redoes_a_killed_stage_under_the_new_key(quality, tmp_path):
    plan, marker = _plan(quality, tmp_path), tmp_path / "A" / "stage" / "done.json"

    def killed():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quality.once(plan, marker, killed, "stage", {"k": 1})
    calls: list[int] = []
    quality.once(plan, marker, _stage(marker, calls), "stage", {"k": 2})  # no marker: not stale, just redone
    assert calls == [1]
    record = tmp_path / ".stage-configs" / "A" / "stage" / "done.json.key.json"
    assert json.loads(record.read_text()) == {"k": 2}


def test_stage_key_picks_dotted_parts_and_ignores_the_data_folder(quality):
    a = RunConfig.model_validate({"data": {"data_dir": "/here"}, "distill": {"beta": 0.5}})
    b = RunConfig.model_validate({"data": {"data_dir": "/there"}, "distill": {"beta": 0.5}})
    key = quality.stage_key(a, "data", "distill.beta", "budget", expert=1)
    assert key == quality.stage_key(b, "data", "distill.beta", "budget", expert=1)
    assert key["distill.beta"] == 0.5 and key["budget"] == 0.05 and key["expert"] == 1
    assert "data_dir" not in key["data"]
    c = RunConfig.model_validate({"data": {"max_length": 64}})
    assert quality.key_differences(key["data"], quality.stage_key(c, "data")["data"]) == ["max_length: 256 -> 64"]


def test_score_rows_are_labelled_by_the_unit(quality, tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps([{"variant": "distilled", "seed": 0, "acc": 0.5, "benchmark": "arc_easy"}]))
    (row,) = quality.score_rows(scores, {"variant": "distilled-beta0", "seed": 2})
    assert row == {"variant": "distilled-beta0", "seed": 2, "acc": 0.5, "benchmark": "arc_easy"}
    scores.write_text(json.dumps([{"benchmark": "mmlu", "acc": 0.3, "acc_macro": 0.25}]))
    (mmlu,) = quality.score_rows(scores, {"seed": 0})
    assert mmlu["acc"] == 0.25 and mmlu["acc_micro"] == 0.3  # the macro average over subjects


def test_paired_t_matches_scipy(quality):
    from scipy import stats

    a, b = [0.535, 0.522, 0.546, 0.51], [0.523, 0.525, 0.539, 0.5]
    t, p = quality.paired_t([x - y for x, y in zip(a, b)])
    ref = stats.ttest_rel(a, b)
    assert t == pytest.approx(ref.statistic, rel=1e-9) and p == pytest.approx(ref.pvalue, rel=1e-9)
    assert math.isnan(quality.paired_t([0.01])[1])
    assert quality.paired_t([0.01, 0.01]) == (math.inf, pytest.approx(math.nan, nan_ok=True))


def test_summary_pairs_seeds(quality):
    rows = [{"setting": "A", "target": "t", "benchmark": "arc_easy", "budget": 0.05, "variant": v, "seed": s,
             "acc": acc} for v, accs in (("distilled", [0.60, 0.50, 0.55]), ("random", [0.50, 0.50, 0.50]),
                                         ("less", [0.55, 0.45, 0.60]))
            for s, acc in enumerate(accs)]
    rows.append({"setting": "A", "target": "t", "benchmark": "arc_easy", "budget": 0.05, "variant": "none",
                 "seed": None, "acc": 0.4})
    rows.append({"setting": "A", "target": "t", "benchmark": "arc_easy", "budget": 0.1, "variant": "random",
                 "seed": 0, "acc": 0.5})
    md = quality.summarise(rows)
    assert "| distilled | 55.0 ± 5.0 | - |" in md and "| none | 40.0 | 40.0 |" in md
    assert "| 10 % | distilled |" not in md  # no distilled row at 10 %: nothing to pair
    line = next(ln for ln in md.splitlines() if ln.startswith("| 5 % | distilled |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "+5.0" and cells[4] == "+1.7"
    t = math.sqrt(3)  # diffs 10, 0, 5: mean 5, sd 5; with 2 dof the two-sided p is 1 - t / sqrt(2 + t^2)
    assert float(cells[3]) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-3)
    assert "## Scorers" not in md  # rows without a method are the harness's, as before the field
    # a record that mixes scorers names the rows nacd's direct scorer made
    for r in rows:
        r["method"] = "direct" if r["variant"] == "none" or r["seed"] == 2 or r["budget"] == 0.1 else "lm_eval"
    note = quality.summarise(rows).split("## Scorers", 1)[1]
    assert "setting A · t: 5 % seed 2, 10 % seed 0, none." in note  # seed 0 at 5 % is the harness's
    # a unit some of whose variants the harness scored names the direct ones
    rows[0]["method"] = "direct"  # distilled, 5 %, seed 0
    note = quality.summarise(rows).split("## Scorers", 1)[1]
    assert "setting A · t: 5 % seed 0 (distilled), 5 % seed 2, 10 % seed 0, none." in note
    assert "## Scorers" not in quality.summarise([{**r, "method": "direct"} for r in rows])


def test_an_identical_text_reuses_its_twins_evaluation(quality, tmp_path):
    plan, scores_root = _plan(quality, tmp_path), tmp_path / "A" / "seed-0" / "scores"
    key = {"target": "t", "training_text_sha256": "ab" * 32}
    first = scores_root / "distilled" / "t"
    quality.once(plan, first / "scores.json", _stage(first / "scores.json", []), "eval", key)
    (first / "adapter").mkdir()
    (first / "adapter" / "weights").write_text("w")
    second = scores_root / "distilled-beta0" / "t"
    assert not quality.reuse_twin(plan, scores_root, second, {**key, "training_text_sha256": "cd" * 32})
    assert not second.exists()
    quality.once(plan, second / "scores.json", lambda: quality.reuse_twin(plan, scores_root, second, key), "eval", key)
    assert (second / "scores.json").read_text() == "{}" and (second / "adapter" / "weights").read_text() == "w"
    assert json.loads((second / "reused-from.json").read_text()) == {"scores": "A/seed-0/scores/distilled/t"}


def test_report_only_runs_no_stage(quality, tmp_path):
    marker, calls = tmp_path / "A" / "stage" / "done.json", []
    report = dataclasses.replace(_plan(quality, tmp_path), report_only=True)
    with pytest.raises(quality.NotRun, match="stage"):
        quality.once(report, marker, _stage(marker, calls), "stage", {"k": 1})
    assert calls == [] and not (tmp_path / ".stage-configs").exists()  # nothing run, nothing recorded
    quality.once(_plan(quality, tmp_path), marker, _stage(marker, calls), "stage", {"k": 1})
    assert quality.once(report, marker, _stage(marker, calls), "stage", {"k": 1}) == 0.0 and calls == [1]
    with pytest.raises(quality.StaleWork):  # a stale stage is refused in a report too
        quality.once(report, marker, _stage(marker, calls), "stage", {"k": 2})


def test_report_only_on_an_empty_work_folder_fails_and_writes_nothing(quality, tmp_path, capsys):
    args = ["--report-only", "--only-setting", "A", "--budgets", "0.05", "--seeds", "0", "--targets", "t",
            "--out", str(tmp_path)]
    assert quality.main(args) == 1
    assert "A budget=0.05 seed=0: prepare" in capsys.readouterr().err
    assert not (tmp_path / "quality.md").exists() and not (tmp_path / "quality.json").exists()


def test_notes_follow_the_report_and_a_missing_notes_file_stops_before_any_stage(quality, tmp_path, monkeypatch):
    args = ["--only-setting", "A", "--budgets", "0.05", "--seeds", "0,1", "--targets", "t", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="--notes .*absent.md: no such file"):
        quality.main([*args, "--notes", str(tmp_path / "absent.md")])
    assert list(tmp_path.iterdir()) == []
    notes = tmp_path / "notes.md"
    notes.write_text("Provenance. Seed 1 ran on another day.\n\n")
    monkeypatch.setattr(quality, "run_unit", lambda plan, setting, budget, seed, name: [
        {"setting": setting, "target": "t", "benchmark": "arc_easy", "budget": budget, "variant": v, "seed": seed,
         "acc": acc + seed / 100} for v, acc in (("distilled", 0.55), ("random", 0.5), ("less", 0.52))])
    assert quality.main([*args, "--notes", str(notes)]) == 0
    md = (tmp_path / "quality.md").read_text()
    assert md.index("| distilled | 55.5 ± 0.7 |") < md.index("\nCommand: `") < md.index("Provenance. Seed 1")
    assert md.endswith("another day.\n") and not list(tmp_path.glob(".*.tmp-*"))


def test_merge_keeps_the_earlier_rows_this_run_does_not_make_again(quality, tmp_path, monkeypatch):
    def row(variant, seed, acc, budget=0.05):
        return {"setting": "A", "target": "t", "benchmark": "arc_easy", "budget": budget, "variant": variant,
                "seed": seed, "acc": acc}
    earlier = [row("distilled", 0, 0.50), row("random", 0, 0.40), row("random", 1, 0.45), row("none", None, 0.3),
               row("none", None, 0.3, budget=0.1)]
    record = tmp_path / "earlier.json"
    record.write_text(json.dumps({"rows": earlier}))
    monkeypatch.setattr(quality, "run_unit", lambda plan, setting, budget, seed, name: [
        row("distilled", seed, 0.60), row("none", None, 0.35)])
    out = tmp_path / "out"
    assert quality.main(["--only-setting", "A", "--budgets", "0.05", "--seeds", "0", "--targets", "t",
                         "--out", str(out), "--merge", str(record)]) == 0
    rows = json.loads((out / "quality.json").read_text())["rows"]
    # made again: distilled seed 0 and none at 5 % are replaced; kept: random and none at 10 %
    assert sorted((r["variant"], r["budget"], r["seed"], r["acc"]) for r in rows) == sorted(
        [("random", 0.05, 0, 0.40), ("random", 0.05, 1, 0.45), ("none", 0.1, None, 0.3),
         ("distilled", 0.05, 0, 0.60), ("none", 0.05, None, 0.35)])
    assert "| distilled | 60.0 (1 seed) |" in (out / "quality.md").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"setting": "A", "acc": 0.5}]}))
    for path, message in ((bad, r"rows\[0\] lacks budget, variant, target, seed, benchmark"),
                          (tmp_path / "absent.json", "not a quality.json")):
        with pytest.raises(SystemExit, match=message):
            quality.main(["--out", str(tmp_path / "never"), "--merge", str(path)])
    assert not (tmp_path / "never").exists()


def test_report_of_the_merged_record_alone_runs_no_unit(quality, tmp_path, monkeypatch):
    rows = [{"setting": "A", "target": "t", "benchmark": "arc_easy", "budget": 0.05, "variant": v, "seed": s,
             "acc": acc + s / 100} for v, acc in (("distilled", 0.55), ("random", 0.5)) for s in (0, 1)]
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"rows": rows}))
    monkeypatch.setattr(quality, "run_unit", lambda *a: pytest.fail("a unit ran"))
    notes = tmp_path / "notes.md"
    notes.write_text("How the record was made.\n")
    out = tmp_path / "out"
    assert quality.main(["--report-only", "--seeds", "", "--merge", str(record), "--out", str(out),
                         "--notes", str(notes)]) == 0
    assert json.loads((out / "quality.json").read_text())["rows"] == rows
    md = (out / "quality.md").read_text()
    assert "| distilled | 55.5 ± 0.7 |" in md and "Not run" not in md and md.endswith("How the record was made.\n")
    assert "Command: `python bench/quality.py --report-only --seeds '' --merge" in md  # as a shell takes it
    # an empty list is for that only; a list that is not numbers is named
    for args, message in ((["--seeds", ""], "--budgets and --seeds name no unit"),
                          (["--report-only", "--budgets", ""], "--budgets and --seeds name no unit"),
                          (["--seeds", "0,x"], "--seeds '0,x': a comma list of int values"),
                          (["--budgets", "5%"], "--budgets '5%': a comma list of float values")):
        with pytest.raises(SystemExit, match=message):
            quality.main([*args, "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    # ablations on no seed and nothing to merge: no report, and the record is not replaced by nothing
    assert quality.main(["--report-only", "--seeds", "", "--ablations", "beta0", "--out", str(out)]) == 1
    assert json.loads((out / "quality.json").read_text())["rows"] == rows


def test_ablations_only_runs_the_ablation_units_on_their_setting(quality, tmp_path, monkeypatch):
    units = []
    monkeypatch.setattr(quality, "run_unit", lambda plan, setting, budget, seed, name: units.append(
        (setting, budget, seed, name, plan.targets)) or [
        {"setting": setting, "target": plan.targets[0], "benchmark": "arc_easy", "budget": budget,
         "variant": f"distilled-{name}", "seed": seed, "acc": 0.5}])
    args = ["--seeds", "0,1,2", "--targets", "t,u", "--out", str(tmp_path)]
    assert quality.main([*args, "--ablations", "P4@1/u:B,beta0@2", "--ablations-only"]) == 0
    assert units == [("B", 0.05, 1, "P4", ["u"]), ("A", 0.05, 2, "beta0", ["t", "u"])]
    with pytest.raises(SystemExit, match="--ablations-only needs --ablations"):
        quality.main([*args, "--ablations-only"])


def test_less_seeded_ablation_distills_on_the_less_rows(quality, tmp_path):
    plan = _plan(quality, tmp_path)
    cfg = quality.setting_config(plan, "A", 0.05, 0, quality.ABLATIONS["straight_through_less_seeds"])
    assert cfg.seed_selection.method == "less" and cfg.distill.straight_through


def test_ablation_specs(quality):
    beta0, p4 = quality._ablations("beta0,P4@0+2/smollm2-135m-instruct")
    assert beta0 == quality.Ablation("beta0") and p4 == quality.Ablation("P4", [0, 2], ["smollm2-135m-instruct"])
    assert quality._ablations("P4@1/t:B") == [quality.Ablation("P4", [1], ["t"], "B")]
    with pytest.raises(SystemExit, match="setting 'C' after ':'"):
        quality._ablations("P4:C")
    with pytest.raises(SystemExit, match="unknown ablation 'beta9'"):
        quality._ablations("beta9")
    with pytest.raises(SystemExit, match="seeds after '@'"):
        quality._ablations("P4@x")


def test_every_ablation_builds_a_valid_config(quality, tmp_path):
    plan = _plan(quality, tmp_path)
    for name, overrides in quality.ABLATIONS.items():
        cfg = quality.setting_config(plan, "A", 0.05, 0, overrides)
        assert cfg.distill.straight_through == name.startswith("straight_through"), name
    # the knob ablations' straight-through twins change the knob and nothing else
    base = quality.setting_config(plan, "A", 0.05, 0, quality.STRAIGHT_THROUGH).distill
    twin = quality.setting_config(plan, "A", 0.05, 0, quality.ABLATIONS["straight_through_P16"]).distill
    assert twin.prompt_len == 16 and twin.model_copy(update={"prompt_len": base.prompt_len}) == base


@pytest.mark.parametrize("scale", ["small", "full"])
def test_each_scale_trains_its_experts_as_far_as_distillation_reads(quality, tmp_path, scale):
    """Each scale's config is valid for both settings, and its experts write every checkpoint the
    distillation can draw (full scale stops them there: a later step would be time spent for nothing)."""
    from nacd.experts import make_plan

    plan = replace(_plan(quality, tmp_path), scale=scale)
    for setting, pool in (("A", 2251), ("B", 10_000)):
        cfg = quality.setting_config(plan, setting, 0.05, 0)
        steps = make_plan(cfg.experts, min(pool, cfg.data.pool_size)).total_steps
        last_read = (cfg.distill.max_start - 1 + cfg.distill.expert_epochs) * cfg.experts.save_every
        assert steps >= last_read, (scale, setting)
        if scale == "full":
            assert steps == last_read


def test_expert_quality_scores_only_an_ablation_with_its_own_experts(expert_quality, tmp_path):
    # a distill-only ablation trains no experts of its own: scoring "its" experts would score the setting's
    with pytest.raises(SystemExit, match="'straight_through_beta0' shares the setting's experts"):
        expert_quality.main(["--work", str(tmp_path), "--ablation", "straight_through_beta0", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_match_eval_scores_every_set_on_one_fixed_list_of_draws(match_eval):
    # every expert x start in [min_start, max_start) x schedule, minibatches as the distill loop draws them
    fixed = match_eval.draws(2, range(1, 4), num_samples=5, batch=4, steps=3, schedules=2, seed=7)
    assert [(e, t) for e, t, _ in fixed] == [(e, t) for e in (0, 1) for t in (1, 2, 3) for _ in range(2)]
    assert all(len(s) == 3 and all(len(b) == 4 and len(set(b.tolist())) == 4 and max(b) < 5 for b in s)
               for _, _, s in fixed)
    again = match_eval.draws(2, range(1, 4), num_samples=5, batch=4, steps=3, schedules=2, seed=7)
    assert all(a.equal(b) for (_, _, x), (_, _, y) in zip(fixed, again) for a, b in zip(x, y))
    assert not fixed[0][2][0].equal(fixed[1][2][0]) or not fixed[0][2][1].equal(fixed[1][2][1])
    # a subset is spread over the list: each expert keeps its share, not the first expert's starts only
    assert [(e, t) for e, t, _ in match_eval.spread(fixed, 4)] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert match_eval.spread(fixed, 0) == fixed and match_eval.spread(fixed, 99) == fixed


def test_match_eval_refuses_an_unknown_run_or_a_missing_distillation_before_scoring(match_eval, tmp_path):
    out = tmp_path / "match.json"
    with pytest.raises(SystemExit, match="unknown ablation.*'beta_zero'"):
        match_eval.main(["--work", str(tmp_path), "--runs", ",beta_zero", "--json", str(out)])
    assert not out.exists()
    with pytest.raises(SystemExit, match="no finished distillation in .*seed-3/synthetic-straight_through_N8"):
        match_eval.main(["--work", str(tmp_path), "--seeds", "3", "--runs", "straight_through_N8", "--json", str(out)])
    assert not out.exists()


def test_expert_quality_combines_runs_of_one_store_only(expert_quality, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    plan = expert_quality.quality.parse_args(["--scale", "small", "--work", str(work), "--out", str(out)])
    cfg = expert_quality.quality.setting_config(plan, "A", 0.05, 0)
    doc = {"store": str(work / "A" / "trajectories"), "experts": cfg.experts.model_dump(mode="json"),
           "distill": cfg.distill.model_dump(mode="json")}
    doc["distill"].pop("min_start")  # written before the field existed

    def row(checkpoint, acc):
        return {"expert": 0, "checkpoint": checkpoint, "step": 2 * checkpoint, "examples_seen": 8 * checkpoint,
                "benchmark": "arc_easy", "n": 570, "acc": acc}

    (tmp_path / "a.json").write_text(json.dumps({**doc, "commands": ["first"], "rows": [row(49, 0.5), row(0, 0.4)]}))
    (tmp_path / "b.json").write_text(json.dumps({**doc, "rows": [row(12, 0.45), row(49, 0.55)]}))
    expert_quality.main(["--work", str(work), "--out", str(out), "--combine", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    combined = json.loads((out / "expert_quality.json").read_text())
    assert [(r["checkpoint"], r["acc"]) for r in combined["rows"]] == [(0, 0.4), (12, 0.45), (49, 0.55)]
    assert combined["commands"][0] == "first" and "--combine" in combined["commands"][-1]
    assert "| 0 | 12 | 24 | 96 | arc_easy | 570 | 45.0 |" in (out / "expert_quality.md").read_text()
    (tmp_path / "c.json").write_text(json.dumps({**doc, "store": "elsewhere", "rows": []}))
    with pytest.raises(SystemExit, match=r"c\.json: 'store' differs"):
        expert_quality.main(["--work", str(work), "--out", str(tmp_path / "out2"), "--combine", str(tmp_path / "c.json")])
    assert not (tmp_path / "out2").exists()


def test_training_text_hash_sees_only_prompt_and_response(quality, tmp_path):
    from nacd.data.variants import write_variant

    rows = [{"id": "d-0", "prompt": "p0", "response": "r0", "nn_distances": [1.0]},
            {"id": "d-1", "prompt": "p1", "response": "r1", "nn_distances": [2.0]}]
    write_variant(rows, tmp_path / "a", {"variant": "distilled"})
    write_variant([{**r, "nn_distances": [9.0]} for r in rows], tmp_path / "b", {"variant": "distilled"})
    write_variant([rows[1], rows[0]], tmp_path / "c", {"variant": "distilled"})
    write_variant([rows[0], {**rows[1], "response": "r1!"}], tmp_path / "d", {"variant": "distilled"})
    a, b, c, d = (quality.training_text_sha256(tmp_path / x) for x in "abcd")
    assert a == b and len({a, c, d}) == 3  # other fields ignored; order and text are not


def test_a_unit_scores_each_variant_before_building_the_next(quality, tmp_path, monkeypatch):
    """A unit stopped midway (a GPU lease's limit, here LESS failing) keeps the scores of the
    variants built before: distilled, random and the untuned model are scored before LESS runs."""
    import nacd.data.prepare
    import nacd.distill.run
    import nacd.evaluation.run
    import nacd.experts
    import nacd.projection
    import nacd.selection.less
    import nacd.selection.random
    import nacd.selection.seeds

    def writes(name: str):
        def stage(*args):
            out = Path(args[-1])
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("{}")
        return stage

    def train_expert(cfg, dataset, store, e):
        writes("manifest.json")(Path(store) / "experts" / f"expert-{e:03d}")

    def less_killed(*args):
        raise RuntimeError("stopped in LESS")

    scored = []

    def evaluate(cfg, target, variant, variant_dir, out):
        scored.append(variant)
        writes("scores.json")(out)
        (Path(out) / "scores.json").write_text(json.dumps([{"benchmark": "arc_easy", "acc": 0.5}]))

    for module, attr, fake in [(nacd.data.prepare, "prepare_data", writes("prepare.json")),
                               (nacd.experts, "train_expert", train_expert),
                               (nacd.selection.seeds, "select_seeds", lambda c, d, o, less: writes("seeds.json")(o)),
                               (nacd.distill.run, "distill", writes("synthetic.json")),
                               (nacd.projection, "project_ids", writes("variant.json")),
                               (nacd.selection.random, "select_random", writes("variant.json")),
                               (nacd.selection.less, "select_less", less_killed),
                               (nacd.evaluation.run, "evaluate", evaluate),
                               (quality, "distill_diagnostics", lambda syn, distilled: {}),
                               (quality, "training_text_sha256", lambda d: "text")]:
        monkeypatch.setattr(module, attr, fake)
    with pytest.raises(RuntimeError, match="stopped in LESS"):
        quality.run_unit(_plan(quality, tmp_path), "A", 0.05, 0)
    assert scored == ["distilled", "random", "none"]
    unit = tmp_path / "A" / "budget-0.05" / "seed-0"
    assert {p.parent.parent.name for p in tmp_path.rglob("scores.json") if ".stage-configs" not in p.parts} == {
        "distilled", "random", "none"}
    assert not (unit / "less" / "variant.json").exists()


def test_gpu_script_checks_its_inputs_before_any_unit_runs(tmp_path):
    script, out = REPO / "bench" / "quality_gpu.sh", tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NACD_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the host's `python3`
    missing = subprocess.run(["bash", str(script), str(out)], check=False, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "NACD_GGUF" in missing.stderr
    assert not out.exists()
    # a model folder without the GGUF files: the run stops at the conversion and names the file,
    # before any unit has started
    (tmp_path / "gguf").mkdir()
    env.update(NACD_GGUF=str(tmp_path / "gguf"), NACD_DATA=str(tmp_path / "data"))
    run = subprocess.run(["bash", str(script), str(out)], check=False, env=env, capture_output=True, text=True)
    assert run.returncode == 1
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in run.stderr and "GGUF file missing" in run.stderr
    assert not (out / "work").exists() and not (out / "units.txt").exists()


def test_the_plot_replaces_the_old_one_whole_or_not_at_all(quality, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    rows = [{"setting": "A", "target": "t", "benchmark": "arc_easy", "budget": b, "variant": v, "seed": s,
             "acc": 0.5 + 0.01 * s} for b in (0.01, 0.05) for v in ("distilled", "random", "less") for s in (0, 1)]
    path = tmp_path / "quality.png"
    path.write_bytes(b"old plot")

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-render")
    with monkeypatch.context() as patched:
        patched.setattr(Figure, "savefig", crash)
        with pytest.raises(RuntimeError, match="mid-render"):
            quality.plot(rows, path)
    assert path.read_bytes() == b"old plot" and [p.name for p in tmp_path.iterdir()] == ["quality.png"]
    quality.plot(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["quality.png"]


def test_bundle_parts_join_back_into_the_archive(gpu_bundle, tmp_path):
    archive = tmp_path / "models.tar.xz"
    archive.write_bytes(bytes(range(256)) * 41)  # 10496 bytes
    parts = gpu_bundle.split_parts(archive, tmp_path, "models", first_bytes=1000, part_bytes=4000)
    assert [p.name for p in parts] == [f"models.part-0{i}" for i in range(4)]
    assert [p.stat().st_size for p in parts] == [1000, 4000, 4000, 1496]
    assert b"".join(p.read_bytes() for p in sorted(tmp_path.glob("models.part-*"))) == archive.read_bytes()
    with pytest.raises(ValueError, match="positive"):
        gpu_bundle.split_parts(archive, tmp_path, "other", first_bytes=0, part_bytes=4000)


def test_bundle_refuses_a_data_folder_of_another_layout(gpu_bundle, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit, match="no arc_easy folder"):
        gpu_bundle.main([str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
    assert not (tmp_path / "out").exists()


FAKE_PYTHON = r'''#!/usr/bin/env bash
# Stands in for the GPU host's python3: conversions succeed, and a unit of bench/quality.py logs
# its start and end; a setting's first unit (the one given --full-seeds) writes its seed selection,
# unless the setting is in $FAIL_SETTINGS, where it stops first; it also logs "trainer NAME". A unit
# NAME listed as NAME:K in $OOM_UNITS runs out of GPU memory on its first K runs, and after those
# fails otherwise if it is in $BROKEN_UNITS. bench/match_eval.py logs what it was asked to score.
if [[ $1 == bench/match_eval.py ]]; then
  shift
  while (($#)); do
    case $1 in
      --scale) scale=$2; shift;; --setting) setting=$2; shift;; --budget) budget=$2; shift;;
      --seeds) seed=$2; shift;; --runs) runs=$2; shift;; --set) sets="${sets:-}+$2"; shift;;
    esac
    shift
  done
  echo "match_eval $setting-$budget-$seed/$scale/runs=$runs/sets=${sets:-}" >> "$EVENTS"
  exit 0
fi
[[ $1 == bench/quality.py ]] || exit 0
shift
while (($#)); do
  case $1 in
    --only-setting) setting=$2; shift;; --budgets) budget=$2; shift;; --seeds) seed=$2; shift;;
    --work) work=$2; shift;; --full-seeds) trainer=1;; --report-only) exit 0;;
  esac
  shift
done
echo "start $setting-$budget-$seed" >> "$EVENTS"
[[ -n ${trainer:-} ]] && echo "trainer $setting-$budget-$seed" >> "$EVENTS"
sleep 0.5
for spec in ${OOM_UNITS:-}; do
  if [[ ${spec%:*} == "$setting-$budget-$seed" ]]; then
    count=$work/.oom-${spec%:*}
    runs=$(($(cat "$count" 2>/dev/null || echo 0) + 1))
    mkdir -p "$work" && echo "$runs" > "$count"
    if ((runs <= ${spec#*:})); then
      echo "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB." >&2
      echo "end $setting-$budget-$seed" >> "$EVENTS"
      exit 1
    fi
  fi
done
if [[ " ${BROKEN_UNITS:-} " == *" $setting-$budget-$seed "* ]]; then
  echo "ValueError: a broken config" >&2
  echo "end $setting-$budget-$seed" >> "$EVENTS"
  exit 1
fi
if [[ -n ${trainer:-} ]]; then
  [[ " $FAIL_SETTINGS " == *" $setting "* ]] && { echo "end $setting-$budget-$seed" >> "$EVENTS"; exit 1; }
  mkdir -p "$work/$setting/budget-$budget/seed-$seed/seeds" && echo '{}' > "$work/$setting/budget-$budget/seed-$seed/seeds/seeds.json"
  echo "seeded $setting" >> "$EVENTS"
  sleep 0.5
fi
echo "end $setting-$budget-$seed" >> "$EVENTS"
'''


def _run_gpu_script(tmp_path: Path, *args: str, **env_vars: str) -> tuple[Path, list[list[str]]]:
    """quality_gpu.sh with a stand-in python3 that logs each unit's start, seeds and end."""
    bin_dir, out, events = tmp_path / "bin", tmp_path / "out", tmp_path / "events.txt"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NACD_")},
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "EVENTS": str(events), "FAIL_SETTINGS": "",
           "NACD_GGUF": str(gguf), "NACD_DATA": str(tmp_path / "data"), **env_vars}
    run = subprocess.run(["bash", str(REPO / "bench" / "quality_gpu.sh"), str(out), *args], check=False, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return out, [line.split() for line in events.read_text().splitlines()]


def test_gpu_script_runs_the_six_headline_units_together_by_default(tmp_path):
    _, log = _run_gpu_script(tmp_path)
    started = [name for kind, name in log if kind == "start"]
    assert sorted(started) == sorted(f"{s}-0.05-{seed}" for s in "AB" for seed in range(3))
    running = most = 0
    for kind, _ in log:
        running += {"start": 1, "end": -1}.get(kind, 0)
        most = max(most, running)
    assert most == 4  # the stand-in trainers are done by then; the four others run at once, not 2 by 2
    _, log = _run_gpu_script(tmp_path / "all", NACD_UNITS="all", NACD_PARALLEL="9")
    started = [name for kind, name in log if kind == "start"]
    assert sorted(started) == sorted(f"{s}-{b}-{seed}" for s in "AB" for b in ("0.01", "0.05", "0.1") for seed in range(3))


def test_gpu_script_scores_each_headline_distillation_on_fixed_draws_after_the_units(tmp_path):
    _, log = _run_gpu_script(tmp_path, "--set", "distill.iterations=5", "--ablations", NACD_UNITS="all", NACD_PARALLEL="9")
    scored = [name for kind, name in log if kind == "match_eval"]
    # the 5 % units only, the headline distillation, at full scale, with the units' --set overrides
    assert sorted(scored) == sorted(f"{s}-0.05-{seed}/full/runs=/sets=+distill.iterations=5" for s in "AB" for seed in range(3))
    last_unit_end = max(i for i, (kind, _) in enumerate(log) if kind == "end")
    assert min(i for i, (kind, _) in enumerate(log) if kind == "match_eval") > last_unit_end


def test_gpu_script_runs_units_after_their_experts_and_never_more_than_parallel_at_once(tmp_path):
    out, log = _run_gpu_script(tmp_path, FAIL_SETTINGS="B", NACD_PARALLEL="2",
                               NACD_UNITS="A:0.05:0 B:0.05:0 A:0.05:1 A:0.01:0 B:0.05:1 A:0.1:2")
    running, most, started = set(), 0, []
    for kind, name in log:
        if kind == "start":
            running.add(name)
            started.append(name)
        elif kind == "end":
            running.discard(name)
        most = max(most, len(running))
    assert most == 2
    # the trainers first; A's other units only once A's trainer wrote its seeds; none of B's others
    assert set(started[:2]) == {"A-0.05-0", "B-0.05-0"} and sorted(started[2:]) == ["A-0.01-0", "A-0.05-1", "A-0.1-2"]
    assert all(log.index(["seeded", "A"]) < log.index(["start", name]) for name in started[2:])
    units = (out / "units.txt").read_text()
    assert "B-0.05-0 rc=1" in units and "B-0.05-1 not run: setting B's first unit stopped" in units
    assert "requeued" not in units and log.count(["start", "B-0.05-0"]) == 1  # not out of memory: not rerun


def test_gpu_script_reruns_a_unit_that_ran_out_of_gpu_memory_with_fewer_units_at_once(tmp_path):
    # A's trainer runs out of memory once before its experts exist, A-0.05-1 twice, B-0.05-1 on every run
    out, log = _run_gpu_script(tmp_path, NACD_PARALLEL="4", NACD_POLL_S="0.2",
                               NACD_UNITS="A:0.05:0 B:0.05:0 A:0.05:1 B:0.05:1 A:0.05:2",
                               OOM_UNITS="A-0.05-0:1 A-0.05-1:2 B-0.05-1:9")
    starts = [name for kind, name in log if kind == "start"]
    assert starts.count("A-0.05-0") == 2 and starts.count("A-0.05-1") == 3 and starts.count("B-0.05-1") == 3
    assert starts.count("B-0.05-0") == starts.count("A-0.05-2") == 1
    # A's other units waited for the rerun trainer's seeds instead of being given up
    assert all(log.index(["seeded", "A"]) < i for i, e in enumerate(log) if e == ["start", "A-0.05-2"])
    units = (out / "units.txt").read_text()
    assert "not run" not in units
    assert "A-0.05-0 rc=0" in units and "A-0.05-1 rc=0" in units and "A-0.05-2 rc=0" in units
    assert units.count("B-0.05-1 rc=1 out of GPU memory") == 3 and "B-0.05-1 not rerun: out of GPU memory 3 times" in units
    # each requeue lowers how many run at once to those still running, never below one
    caps = [int(line.split("at most ")[1].split()[0]) for line in units.splitlines() if "requeued" in line]
    assert len(caps) == 5 and caps == sorted(caps, reverse=True) and caps[-1] >= 1
    running, most = set(), 0
    for kind, name in log:
        running = running | {name} if kind == "start" else running - {name} if kind == "end" else running
        most = max(most, len(running))
    assert most <= 4
    # a rerun appends to the unit's log: both tries' output is kept
    assert (out / "logs" / "A-0.05-1.log").read_text().count("CUDA out of memory") == 2


def test_gpu_script_reruns_a_setting_s_trainer_as_its_trainer_and_only_out_of_memory_failures(tmp_path):
    # a resumed run: A's seeds exist, so A-0.01-0 starts beside A's trainer, and both run out of
    # memory before one poll; the trainer goes first and no other unit takes its part. A-0.1-0's
    # second run fails otherwise: it is not rerun, though its log holds the first run's error.
    seeds = tmp_path / "out" / "work" / "A" / "budget-0.05" / "seed-0" / "seeds" / "seeds.json"
    seeds.parent.mkdir(parents=True)
    seeds.write_text("{}")
    out, log = _run_gpu_script(tmp_path, NACD_PARALLEL="4", NACD_POLL_S="2", NACD_UNITS="A:0.05:0 A:0.01:0 A:0.1:0",
                               OOM_UNITS="A-0.05-0:1 A-0.01-0:1 A-0.1-0:1", BROKEN_UNITS="A-0.1-0")
    assert [name for kind, name in log if kind == "trainer"] == ["A-0.05-0", "A-0.05-0"]
    starts = [name for kind, name in log if kind == "start"]
    assert sorted(starts) == ["A-0.01-0", "A-0.01-0", "A-0.05-0", "A-0.05-0", "A-0.1-0", "A-0.1-0"]
    units = (out / "units.txt").read_text()
    assert "A-0.05-0 rc=0" in units and "A-0.01-0 rc=0" in units
    assert "A-0.1-0 requeued" in units and units.count("A-0.1-0 requeued") == 1
    assert units.splitlines()[-1].startswith("A-0.1-0 rc=1 ") and "memory" not in units.splitlines()[-1]


def test_bundle_manifest_names_the_parts_that_join_into_the_models_archive(gpu_bundle, tmp_path, monkeypatch):
    import nacd.models

    ggufs = []
    for name in ("small.gguf", "large.gguf"):
        ggufs.append(tmp_path / name)
        ggufs[-1].write_bytes(os.urandom(15_000))  # incompressible: the archive needs several parts
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(nacd.models, "smollm2_gguf", lambda: ggufs[0])
    monkeypatch.setattr(nacd.models, "gemma3_gguf", lambda: ggufs[1])
    monkeypatch.setattr(nacd.models, "resolve", lambda name: str(tok))
    (tmp_path / "data" / "arc_easy").mkdir(parents=True)
    out = tmp_path / "out"
    assert gpu_bundle.main([str(out), "--data-dir", str(tmp_path / "data"), "--no-wheels",
                            "--first-part-mib", str(10_000 / gpu_bundle.MIB), "--part-mib", str(20_000 / gpu_bundle.MIB)]) == 0
    manifest = json.loads((out / "bundle.json").read_text())
    parts = [out / name for name in manifest["models.tar.xz"]["parts"]]
    joined = b"".join(p.read_bytes() for p in parts)
    assert len(joined) == manifest["models.tar.xz"]["bytes"] and len(parts) >= 2
    assert hashlib.sha256(joined).hexdigest() == manifest["models.tar.xz"]["sha256"]
    members = subprocess.run(["tar", "-tJf", "-"], input=joined, capture_output=True, check=True).stdout.decode().split()
    assert members == ["small.gguf", "large.gguf", "gguf.sha256"]
    host = subprocess.run(["tar", "-tJf", str(out / "host.tar.xz")], capture_output=True, check=True, text=True).stdout
    assert "tok/tokenizer.json" in host and "whl" not in host
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "host.tar.xz", *[p.name for p in parts]]
