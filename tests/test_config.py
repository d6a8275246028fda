import pytest

from nacd.config import ConfigError, budget_count, load_config


def test_defaults_validate():
    cfg = load_config()
    assert cfg.source.name == "smollm2-135m-instruct"
    assert cfg.distill.grad_mode == "reverse"


def test_override_sets_nested_value_with_yaml_typing():
    cfg = load_config(overrides=["distill.iterations=7", "distill.beta=0.5", "data.template=chat"])
    assert cfg.distill.iterations == 7 and cfg.distill.beta == 0.5 and cfg.data.template == "chat"


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("distill:\n  iteratons: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'distill.iteratons'"):
        load_config(p)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"'distill.syn_steps'"):
        load_config(overrides=["distill.syn_steps=abc"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/nacd.yaml")


@pytest.mark.parametrize("budget,pool,expected", [(0.05, 2251, 113), (10, 2251, 10), (1.0, 7, 1)])
def test_budget_count(budget, pool, expected):
    assert budget_count(budget, pool) == expected


@pytest.mark.parametrize("budget,pool", [(0.0001, 100), (500, 100)])
def test_impossible_budget(budget, pool):
    with pytest.raises(ConfigError, match="budget"):
        budget_count(budget, pool)


def test_override_indexes_a_list_from_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("evaluation:\n  benchmarks:\n    - {name: arc_easy, split: validation}\n")
    cfg = load_config(p, ["evaluation.benchmarks.0.limit=20"])
    assert cfg.evaluation.benchmarks[0].limit == 20


@pytest.mark.parametrize("item,match", [("evaluation.benchmarks.0.limit=1", "set the whole list"),
                                        ("distill.iterations.x=1", "distill.iterations")])
def test_override_path_errors(item, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[item])


def test_per_target_finetune_recipe(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("evaluation:\n  finetune: {lr: 1.0e-3, epochs: 3}\n"
                 "  finetune_per_target:\n    gemma3-270m: {lr: 2.0e-4, param_space: {lora_r: 4}}\n")
    ev = load_config(p).evaluation
    gemma, smol = ev.finetune_for("gemma3-270m"), ev.finetune_for("smollm2-135m-instruct")
    assert (gemma.lr, gemma.epochs, gemma.param_space.lora_r, gemma.param_space.kind) == (2e-4, 3, 4, "lora")
    assert smol == ev.finetune and smol.lr == 1e-3


@pytest.mark.parametrize("change, match", [("{lrr: 1}", r"finetune_per_target.gemma3-270m: unknown key 'lrr'"),
                                           ("{lr: -1}", r"finetune_per_target.gemma3-270m: 'lr'")])
def test_bad_per_target_recipe_is_named(change, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[f"evaluation.finetune_per_target={{gemma3-270m: {change}}}"])


@pytest.mark.parametrize("item, key", [("budget=.inf", "'budget'"), ("experts.lr=.inf", "'experts.lr'"),
                                       ("distill.beta=.nan", "'distill.beta'")])
def test_infinite_and_nan_values_are_refused(item, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[item])


def test_no_start_checkpoint_to_draw_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"'distill': min_start=4 leaves no start checkpoint below max_start=4"):
        load_config(overrides=["distill.min_start=4"])
    assert load_config(overrides=["distill.min_start=24", "distill.max_start=48"]).distill.min_start == 24


def test_yaml_faults_name_where(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("distill:\n  iterations: 3\n  beta: [0.1,\n")
    with pytest.raises(ConfigError, match=rf"{p}: not valid YAML: .* at line 4, column 1$"):
        load_config(p)
    p.write_bytes(b"distill:\n  iterations: \xff\n")
    with pytest.raises(ConfigError, match=rf"{p}: not UTF-8 text"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"--set 'distill.iterations=\[1,': the value is not valid YAML"):
        load_config(overrides=["distill.iterations=[1,"])
