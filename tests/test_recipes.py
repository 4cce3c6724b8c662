"""Every recipe in recipes/ parses through the parser `posttrain` itself builds into its command's typed
configs (recipes/<model>/<command>-<what>.yaml), sets nothing the command does not know, and names a
known model; SFT recipes also a known prompt style and batching mode."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from posttrain import cli
from posttrain.data.batching import MODES
from posttrain.models.registry import PRESETS
from posttrain.prompts import LOSS_MODES, STYLES
from posttrain.train.loop import TrainConfig
from posttrain.train.sft import DataConfig, SampleConfig, check_choices

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("**/*.yaml"))
SECTIONS = {"data": DataConfig, "train": TrainConfig, "samples": SampleConfig}


@pytest.fixture(scope="module")
def parser():
    return cli.parser()


def command_of(path: Path) -> str:
    """recipes/<model>/<command>-<what>.yaml: the subcommand a recipe is for (sft, dpo, classify, ...)."""
    return path.name.split("-", 1)[0]


def parse_recipe(parser, path: Path):
    """The recipe as `posttrain <command> --config PATH` sees it: typed configs instantiated."""
    command = command_of(path)
    return getattr(parser.instantiate(parser.parse_args([command, "--config", str(path)])), command)


def plain(value):
    return list(value) if isinstance(value, tuple) else value


def assert_reached(typed, raw: dict, where: str) -> None:
    """Every key of the file reached the typed config with its value (nothing silently dropped)."""
    for key, value in raw.items():
        got = typed[key] if isinstance(typed, dict) else getattr(typed, key)
        if isinstance(value, dict):
            assert_reached(got, value, f"{where}{key}.")
        else:
            assert plain(got) == value, f"{where}{key}: file says {value!r}, parsed {got!r}"


def test_recipes_exist():
    assert len(RECIPES) >= 5
    assert {p.parent.name for p in RECIPES} >= {"gpt2", "gpt2-medium", "smollm2-135m-instruct"}
    assert any(command_of(p) == "sft" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses_into_typed_configs(parser, path):
    assert command_of(path) in cli.commands(), f"{path.name}: posttrain has no `{command_of(path)}` command"
    raw = yaml.safe_load(path.read_text())
    cfg = parse_recipe(parser, path)
    assert_reached(cfg, raw, "")
    # recipes/<model>/<command>-<what>.yaml starts from <model> (a preset), or from the run of a recipe
    # beside it (DPO after SFT: runs/<that recipe's name>)
    if cfg.model not in PRESETS:
        siblings = {yaml.safe_load(p.read_text())["name"]: p for p in path.parent.glob("*.yaml") if p != path}
        assert cfg.model.startswith("runs/") and cfg.model[len("runs/"):] in siblings, \
            f"{path.name}: model {cfg.model!r} is neither a preset nor runs/<name of a recipe beside it>"
        assert yaml.safe_load(siblings[cfg.model[len("runs/"):]].read_text())["model"] == path.parent.name
    else:
        assert cfg.model == path.parent.name
    assert cfg.train.schedule in ("constant", "linear", "cosine")
    if command_of(path) != "sft":
        return
    for section, cls in SECTIONS.items():
        assert isinstance(getattr(cfg, section), cls)
    assert cfg.data.style in STYLES and cfg.data.batching in MODES and cfg.data.loss_on in LOSS_MODES
    check_choices(cfg.data)  # the sft command's own check
    assert abs(sum(cfg.data.split) - 1) < 1e-6


@pytest.mark.parametrize("path", [p for p in RECIPES if command_of(p) == "sft"][:1], ids=lambda p: p.name)
def test_print_config_shows_the_resolved_recipe(parser, path, capsys, tmp_path):
    """`posttrain sft --config X --print_config` prints a complete config that parses back to the same."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sft", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    raw = yaml.safe_load(path.read_text())
    assert printed["model"] == raw["model"] and printed["data"]["batching"] == raw["data"]["batching"]
    assert set(printed["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}  # defaults filled in
    resolved = tmp_path / "sft-resolved.yaml"
    resolved.write_text(yaml.safe_dump(printed))
    again, original = parse_recipe(parser, resolved), parse_recipe(parser, path)
    for key in ("model", "data", "train", "samples", "run_dir", "runs", "name"):
        assert getattr(again, key) == getattr(original, key), key


def test_the_batching_comparison_recipes_differ_only_in_batching(parser):
    runs = {p.stem.rsplit("-", 1)[1]: parse_recipe(parser, p)
            for p in sorted((RECIPES_DIR / "gpt2").glob("sft-alpaca-cleaned-*.yaml"))}
    assert sorted(runs) == sorted(MODES)
    for mode, cfg in runs.items():
        assert cfg.data.batching == mode and cfg.name.endswith(mode)

    def without_mode(cfg):
        d = dataclasses.asdict(cfg.data) if dataclasses.is_dataclass(cfg.data) else dict(cfg.data)
        return {**d, "batching": None}, cfg.train, cfg.samples, cfg.model

    first = without_mode(runs["padding"])
    assert all(without_mode(cfg) == first for cfg in runs.values())


@pytest.mark.parametrize("bad", [
    "data:\n  batchingg: packed\n",            # misspelt key
    "train:\n  style: alpaca\n",               # key in the wrong section
    "epochs: 3\n",                             # top-level key the command does not have
    "train:\n  lr: fast\n",                    # wrong type
])
def test_unknown_or_mistyped_keys_fail(parser, tmp_path, bad):
    path = tmp_path / "bad.yaml"
    path.write_text("model: gpt2\n" + bad)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["sft", "--config", str(path)])
    assert exit_info.value.code == 2
