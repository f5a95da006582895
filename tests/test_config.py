"""Recipes, overrides and validation: every mistake names its key and the fix."""

import json
from pathlib import Path

import pytest

from barlow.config import (
    Config,
    apply_overrides,
    from_dict,
    load_config,
    read_recipe,
    shipped_recipes,
)
from barlow.methods import method_parameters


def test_the_documented_recipes_are_shipped() -> None:
    assert {"digits", "fashion-mnist", "cifar10-resnet18", "imagenet-resnet50"} <= set(
        shipped_recipes()
    )


@pytest.mark.parametrize("recipe", sorted(shipped_recipes()))
def test_every_shipped_recipe_loads_and_round_trips(recipe: str) -> None:
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)
    assert from_dict(cfg.to_dict()) == cfg
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # as saved beside a run


def test_the_fast_recipe_is_the_cpu_recipe_with_only_the_screened_levers() -> None:
    """fashion-mnist-fast's comments cite one lever-table row per change: a change not in the
    table (or a change to fashion-mnist that the fast recipe does not follow) fails here."""
    base, fast = load_config("fashion-mnist").to_dict(), load_config("fashion-mnist-fast").to_dict()
    changed = {
        f"{section}.{key}"
        for section, values in base.items()
        for key in values
        if values[key] != fast[section][key]
    }
    levers = {"data.crop_size", "data.view_changes", "method.params", "eval.online_knn_every"}
    levers |= {"model.feature_grid"}
    assert changed == levers | {"eval.baselines", "train.epochs"}
    assert fast["data"]["crop_size"] == 24 and fast["method"]["params"] == {
        "projector": "512-512-512"
    }
    assert fast["model"]["feature_grid"] == 3


def test_code_defaults_are_a_valid_config() -> None:
    assert from_dict({}) == Config()
    assert from_dict(Config().to_dict()) == Config()


def test_imagenet_recipe_holds_the_paper_numbers() -> None:
    cfg = load_config("imagenet-resnet50")
    assert cfg.model.backbone == "resnet50"
    assert cfg.method.name == "barlow_twins"
    assert cfg.method.params["projector"] == "8192-8192-8192"
    assert cfg.method.params["lambd"] == 0.0051
    optim = cfg.optim
    assert (optim.name, optim.lr, optim.bias_lr) == ("lars", 0.2, 0.0048)
    assert (optim.eta, optim.momentum) == (0.001, 0.9)
    assert (optim.warmup_epochs, optim.final_lr_ratio) == (10, 0.001)
    assert optim.weight_decay == 1.5e-6
    assert (cfg.train.batch_size, cfg.train.epochs) == (2048, 1000)


def test_overrides_parse_toml_values() -> None:
    cfg = load_config(
        "digits",
        [
            "optim.lr=0.3",
            "train.epochs=5",
            "data.dataset=fashion-mnist",
            "method.lambd=0.01",
            "eval.baselines=false",
            'data.root="/data/my images"',
        ],
    )
    assert cfg.optim.lr == 0.3 and type(cfg.optim.lr) is float
    assert cfg.train.epochs == 5 and type(cfg.train.epochs) is int
    assert cfg.data.dataset == "fashion-mnist"
    assert cfg.method.params["lambd"] == 0.01
    assert cfg.eval.baselines is False
    assert cfg.data.root == "/data/my images"


def test_integers_are_accepted_for_float_keys() -> None:
    cfg = load_config("digits", ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float


def test_string_keys_keep_number_like_text() -> None:
    cfg = load_config("digits", ["method.projector=512", "data.root=2024"])
    assert cfg.method.params["projector"] == "512"
    assert cfg.data.root == "2024"


def test_later_overrides_win() -> None:
    assert load_config("digits", ["optim.lr=0.3", "optim.lr=0.5"]).optim.lr == 0.5


def test_apply_overrides_leaves_the_recipe_alone() -> None:
    raw = read_recipe("digits")
    before = json.dumps(raw, sort_keys=True)
    apply_overrides(raw, ["optim.lr=0.9", "train.seed=3"])
    assert json.dumps(raw, sort_keys=True) == before


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("optim.lrr=0.3", "did you mean 'lr'"),
        ("train.epoch=3", "did you mean 'epochs'"),
        ("method.lamda=0.1", "did you mean 'lambd'"),
        ("optimm.lr=0.3", "did you mean 'optim'"),
    ],
)
def test_unknown_keys_suggest_the_closest(override: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match=suggestion):
        load_config("digits", [override])


def test_unknown_section_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown config section \[zzz\]"):
        load_config("digits", ["zzz.lr=0.3"])


@pytest.mark.parametrize("override", ["optim.lr", "lr=0.3", "optim.=0.3"])
def test_malformed_override_shows_the_form(override: str) -> None:
    with pytest.raises(ValueError, match=r"section\.key=value"):
        load_config("digits", [override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=-0.1", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.momentum=1", "optim.momentum"),
        ("optim.name=adam", "optim.name"),
        ("train.epochs=0", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("train.batch_size=1", "train.batch_size"),
        ("train.precision=fp8", "train.precision"),
        ("train.compile=yes", "train.compile"),
        ("train.dist_timeout_s=0", "train.dist_timeout_s"),
        ("train.resume_weights_only=1", "train.resume_weights_only"),
        ("data.skip_corrupt=yes", "data.skip_corrupt"),
        ("data.crop_size=2", "data.crop_size"),
        ("data.views=barlow-grey", "data.views"),
        ("model.backbone=resnet19", "model.backbone"),
        ("model.width=0", "model.width"),
        ("model.width=16.5", "model.width"),
        ("model.feature_grid=0", "model.feature_grid"),
        ("model.feature_grid=2.5", "model.feature_grid"),
        ("method.lambd=abc", "method.lambd"),
        ("method.projector=8192-abc", "method.projector"),
        ("method.loss_path=fast", "method.loss_path"),
        ("method.name=barlow_twinz", "unknown method 'barlow_twinz'"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config("digits", [override])


def test_model_width_is_for_small_cnn_only() -> None:
    assert load_config("digits", ["model.width=16"]).model.width == 16
    with pytest.raises(ValueError, match=r"model\.width=16: only small_cnn takes a width"):
        load_config("digits", ["model.backbone=resnet18", "model.width=16"])


def test_model_feature_grid_is_for_small_cnn_only() -> None:
    assert load_config("digits", ["model.feature_grid=2"]).model.feature_grid == 2
    with pytest.raises(ValueError, match=r"model\.feature_grid=2: only small_cnn takes"):
        load_config("digits", ["model.backbone=resnet18", "model.feature_grid=2"])


def test_unknown_method_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match="did you mean 'barlow_twins'"):
        load_config("digits", ["method.name=barlow_twinz"])


def test_method_keys_are_the_constructor_keywords() -> None:
    legal = method_parameters("barlow_twins")
    assert {"projector", "lambd"} <= set(legal)
    assert "backbone" not in legal and "self" not in legal


def test_recipe_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[optim]\nlr = 0.7\n[model]\nbackbone = "resnet18"\n')
    cfg = load_config(str(path), ["train.epochs=2"])
    assert (cfg.optim.lr, cfg.model.backbone, cfg.train.epochs) == (0.7, "resnet18", 2)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[optim\nlr = 0.2\n")
    with pytest.raises(ValueError, match=r"broken\.toml"):
        load_config(str(path))


def test_non_utf8_recipe_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[data]\ndataset = "caf\xe9"\n')
    with pytest.raises(ValueError, match=r"latin1\.toml"):
        load_config(str(path))


def test_missing_recipe_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_config(str(tmp_path / "nope.toml"))
    assert all(name in str(info.value) for name in shipped_recipes())


def test_misspelt_recipe_suggests_the_closest() -> None:
    with pytest.raises(FileNotFoundError, match="did you mean 'digits'"):
        load_config("digit")


def test_recipe_values_outside_a_table_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "flat.toml"
    path.write_text("lr = 0.2\n")
    with pytest.raises(ValueError, match=r"outside any \[section\]; it belongs in \[optim\]"):
        load_config(str(path))
    path.write_text("nonsense = 1\n")
    with pytest.raises(ValueError, match=r"top-level names are sections \(\[data\], "):
        load_config(str(path))
    path.write_text("optim = 0.2\n")
    with pytest.raises(ValueError, match=r"\[optim\] must be a table"):
        load_config(str(path))
