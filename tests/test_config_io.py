"""Tests for pretrain.config_io: strict dataclass configs from YAML + dotted overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from pretrain.config_io import (
    ConfigError,
    deep_merge,
    dump_yaml,
    from_dict,
    load_config,
    load_yaml_tree,
    parse_overrides,
    to_dict,
)


@dataclass
class UNet:
    channels: int = 64
    block_channels: list[int] = field(default_factory=lambda: [64, 128])
    kernel: tuple[int, int] = (3, 3)
    dropouts: tuple[float, ...] = (0.0,)

    def validate(self) -> None:
        if self.channels <= 0:
            raise ValueError(f"channels must be positive, got {self.channels}")


@dataclass
class Model:
    unet: UNet = field(default_factory=UNet)
    prediction: Literal["eps", "v"] = "eps"
    ema_decay: Optional[float] = None
    text_dim: int | None = 512


@dataclass
class Train:
    steps: int = 1000
    lr: float = 1e-3
    use_amp: bool = True
    tags: dict[str, int] = field(default_factory=dict)
    extra: Any = None


@dataclass
class Data:
    name: str  # required: no default


@dataclass
class Root:
    data: Data
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)


@dataclass
class Unions:
    sub: Optional[UNet] = None
    sizes: list[int] | None = None
    seed: int | str = 0


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- YAML trees


def test_base_inclusion_merges_in_order_and_own_keys_win(tmp_path: Path) -> None:
    write(tmp_path / "bases/a.yaml", "train: {steps: 1, lr: 0.5}\nmodel: {unet: {block_channels: [1, 2]}}\n")
    write(tmp_path / "bases/b.yaml", "train: {steps: 2}\nmodel: {unet: {channels: 8}}\n")
    top = write(
        tmp_path / "exp/top.yaml",
        "_base_: [../bases/a.yaml, ../bases/b.yaml]\nmodel: {unet: {block_channels: [9]}}\ndata: {name: x}\n",
    )
    tree = load_yaml_tree(top)
    assert tree == {
        "train": {"steps": 2, "lr": 0.5},  # b over a, lr kept from a
        "model": {"unet": {"block_channels": [9], "channels": 8}},  # list replaced, not merged
        "data": {"name": "x"},
    }


def test_single_string_base_is_resolved_relative_to_including_file(tmp_path: Path) -> None:
    write(tmp_path / "sub/base.yaml", "train: {steps: 7}\n")
    top = write(tmp_path / "sub/top.yaml", "_base_: base.yaml\ntrain: {lr: 0.1}\n")
    assert load_yaml_tree(top) == {"train": {"steps": 7, "lr": 0.1}}


def test_base_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "_base_: b.yaml\nx: 1\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\ny: 2\n")
    with pytest.raises(ConfigError, match=r"cycle.*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_yaml_tree(tmp_path / "a.yaml")


def test_missing_yaml_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "cfg.yaml"
    with pytest.raises(ConfigError, match="cannot read config file .*No such file") as info:
        load_yaml_tree(missing)
    assert str(missing) in str(info.value)


def test_missing_base_file_names_the_base_path(tmp_path: Path) -> None:
    top = write(tmp_path / "top.yaml", "_base_: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"cannot read config file .*gone\.yaml"):
        load_yaml_tree(top)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "a: 1\nb: x: 2\nc: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml at line 2, column 5: mapping values are not allowed"):
        load_yaml_tree(bad)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    bad = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: top level must be a mapping, got list"):
        load_yaml_tree(bad)


def test_yaml_file_reads_exponent_floats(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "lr: 1e-4\nbig: 3e5\nsigned: 2.5E+2\n")
    assert load_yaml_tree(cfg) == {"lr": 1e-4, "big": 3e5, "signed": 250.0}


def test_deep_merge_is_pure() -> None:
    base = {"a": {"b": [1], "c": 1}}
    override = {"a": {"c": 2}}
    merged = deep_merge(base, override)
    merged["a"]["b"].append(2)
    assert merged == {"a": {"b": [1, 2], "c": 2}}
    assert base == {"a": {"b": [1], "c": 1}}
    assert override == {"a": {"c": 2}}


# ----------------------------------------------------------------------------- overrides


def test_parse_overrides_types() -> None:
    parsed = parse_overrides(
        [
            "train.steps=50",
            "train.lr=1e-4",
            "train.big=3e5",
            "model.unet.block_channels=[32,64]",
            "train.use_amp=false",
            "data.name=digits",
            "model.ema_decay=null",
        ]
    )
    assert parsed == {
        "train": {"steps": 50, "lr": 1e-4, "big": 3e5, "use_amp": False},
        "model": {"unet": {"block_channels": [32, 64]}, "ema_decay": None},
        "data": {"name": "digits"},
    }
    assert type(parsed["train"]["lr"]) is float
    assert type(parsed["train"]["big"]) is float


def test_exponent_floats_inside_override_lists() -> None:
    assert parse_overrides(["x=[1e-4, 2]"]) == {"x": [1e-4, 2]}


@pytest.mark.parametrize("item", ["train.steps", "=5", "train..steps=5", "train.=5"])
def test_bad_override_names_the_item(item: str) -> None:
    with pytest.raises(ConfigError, match="bad override") as info:
        parse_overrides([item])
    assert repr(item) in str(info.value)


def test_load_config_layers_defaults_file_and_overrides(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "data: {name: file}\ntrain: {steps: 10, lr: 0.5}\n")
    root = load_config(
        Root,
        cfg,
        overrides=["train.steps=50", "train.lr=1e-4", "model.unet.block_channels=[32,64]"],
        base={"train": {"use_amp": False, "steps": 1}, "data": {"name": "embedded"}},
    )
    assert root.data.name == "file"
    assert root.train == Train(steps=50, lr=1e-4, use_amp=False)
    assert root.model.unet.block_channels == [32, 64]
    assert root.model.unet.channels == 64


def test_load_config_error_mentions_file(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "data: {name: x}\ntrain: {stpes: 3}\n")
    with pytest.raises(ConfigError, match=r"'train\.stpes'.*c\.yaml"):
        load_config(Root, cfg)


# ----------------------------------------------------------------------------- from_dict


def test_unknown_key_names_full_path_and_suggests() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(Root, {"data": {"name": "x"}, "model": {"unet": {"chanels": 3}}})
    message = str(info.value)
    assert "unknown config key 'model.unet.chanels'" in message
    assert "did you mean 'channels'?" in message
    assert "valid keys: channels, block_channels, kernel, dropouts" in message


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'zzzzzz'") as info:
        from_dict(Root, {"data": {"name": "x"}, "zzzzzz": 1})
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        ({"train": {"steps": "abc"}}, "train.steps", "int"),
        ({"train": {"steps": True}}, "train.steps", "int"),
        ({"train": {"lr": False}}, "train.lr", "float"),
        ({"train": {"use_amp": 1}}, "train.use_amp", "bool"),
        ({"model": {"unet": {"block_channels": [1, "x"]}}}, r"model.unet.block_channels\[1\]", "int"),
        ({"model": {"unet": {"block_channels": 5}}}, "model.unet.block_channels", r"list\[int\]"),
        ({"train": {"tags": {"a": "b"}}}, "train.tags.a", "int"),
        ({"model": {"text_dim": "big"}}, "model.text_dim", r"int \| None"),
        ({"model": {"unet": "wide"}}, "model.unet", "a mapping for UNet"),
    ],
)
def test_wrong_type_names_path_and_expected_type(data: dict, path: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{path}: expected {expected}"):
        from_dict(Root, {"data": {"name": "x"}, **data})


def test_wrong_type_message_shows_value() -> None:
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'abc' \(str\)"):
        from_dict(Root, {"data": {"name": "x"}, "train": {"steps": "abc"}})


def test_int_is_accepted_for_float_and_converted() -> None:
    root = from_dict(Root, {"data": {"name": "x"}, "train": {"lr": 1}, "model": {"ema_decay": 1}})
    assert type(root.train.lr) is float and root.train.lr == 1.0
    assert type(root.model.ema_decay) is float


def test_literal_rejects_other_values() -> None:
    assert from_dict(Model, {"prediction": "v"}).prediction == "v"
    with pytest.raises(ConfigError, match=r"^prediction: expected Literal\['eps', 'v'\], got 'x0'"):
        from_dict(Model, {"prediction": "x0"})


def test_optional_accepts_none() -> None:
    model = from_dict(Model, {"ema_decay": None, "text_dim": None})
    assert model.ema_decay is None
    assert model.text_dim is None
    assert from_dict(Model, {"ema_decay": 0.99}).ema_decay == 0.99


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sub": {"chanels": 1}}, r"^unknown config key 'sub\.chanels' \(did you mean 'channels'\?\)"),
        ({"sub": "wide"}, r"^sub: expected UNet \| None, got 'wide'"),
        ({"sizes": [1, "x"]}, r"^sizes\[1\]: expected int, got 'x'"),
        ({"sizes": "x"}, r"^sizes: expected list\[int\] \| None, got 'x'"),
        ({"seed": 1.5}, r"^seed: expected int \| str, got 1\.5 \(float\)"),
    ],
)
def test_union_errors_keep_the_most_precise_message(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(Unions, data)


def test_union_accepts_any_member() -> None:
    built = from_dict(Unions, {"seed": "abc", "sub": {"channels": 4}})
    assert built == Unions(sub=UNet(channels=4), seed="abc")
    assert from_dict(Unions, {"seed": 7}).seed == 7


def test_none_for_non_optional_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^steps: expected int, got None"):
        from_dict(Train, {"steps": None})


def test_tuples_are_built_from_lists() -> None:
    unet = from_dict(UNet, {"kernel": [5, 1], "dropouts": [0.1, 0]})
    assert unet.kernel == (5, 1)
    assert unet.dropouts == (0.1, 0.0)
    assert type(unet.dropouts[1]) is float


def test_fixed_length_tuple_rejects_wrong_length() -> None:
    with pytest.raises(ConfigError, match=r"^kernel: expected tuple\[int, int\], got 3 items"):
        from_dict(UNet, {"kernel": [3, 3, 3]})


def test_any_accepts_anything() -> None:
    assert from_dict(Train, {"extra": {"k": [1, "a"]}}).extra == {"k": [1, "a"]}


def test_missing_required_field_is_an_error() -> None:
    with pytest.raises(ConfigError, match="missing required config key 'data.name'"):
        from_dict(Root, {"data": {}})


def test_missing_keys_take_defaults() -> None:
    root = from_dict(Root, {"data": {"name": "x"}})
    assert root == Root(data=Data(name="x"))
    assert root.model.unet.block_channels == [64, 128]


def test_validate_error_is_prefixed_with_path() -> None:
    with pytest.raises(ConfigError, match=r"^model\.unet: channels must be positive, got 0$"):
        from_dict(Root, {"data": {"name": "x"}, "model": {"unet": {"channels": 0}}})


# ----------------------------------------------------------------------------- round trips


def sample_root() -> Root:
    unet = UNet(channels=32, block_channels=[32, 64], kernel=(1, 3), dropouts=(0.1, 0.2))
    return Root(
        data=Data(name="digits"),
        model=Model(unet=unet, prediction="v", ema_decay=0.9999, text_dim=None),
        train=Train(steps=5, lr=1e-4, use_amp=False, tags={"a": 1}, extra=[1, {"b": None}]),
    )


def test_to_dict_is_plain_yaml_types() -> None:
    plain = to_dict(sample_root())
    unet = {"channels": 32, "block_channels": [32, 64], "kernel": [1, 3], "dropouts": [0.1, 0.2]}
    assert plain["model"]["unet"] == unet
    assert plain["model"]["text_dim"] is None
    assert from_dict(Root, plain) == sample_root()


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "run" / "config.yaml"
    dump_yaml(sample_root(), target)
    assert [p.name for p in target.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    text = target.read_text()
    assert text.index("data:") < text.index("model:") < text.index("train:")  # field order, not sorted
    assert from_dict(Root, yaml.safe_load(text)) == sample_root()
    assert load_config(Root, target) == sample_root()


def test_to_dict_rejects_non_yaml_values() -> None:
    bad = dataclasses.replace(sample_root(), train=Train(extra=Path("/x")))
    with pytest.raises(TypeError, match=r"train\.extra: cannot write PosixPath"):
        to_dict(bad)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_run_config_loads(path: Path) -> None:
    """A typo or a renamed field in a shipped recipe fails here, not in a user's first run."""
    from pretrain.config import load_run_config  # noqa: PLC0415

    config = load_run_config(path)
    assert config.train.steps > 0 and config.model.image_size > 0


def test_small_digits_is_the_demo_recipe_at_the_small_size() -> None:
    """What benchmarks/gpu.sh trains: every recipe field of the demo, every model field of `small`."""
    from pretrain.config import load_run_config  # noqa: PLC0415

    demo, small = load_run_config(CONFIGS / "demo.yaml"), load_run_config(CONFIGS / "model" / "small.yaml")
    both = load_run_config(CONFIGS / "small-digits.yaml")
    for section in ("loss", "optim", "train", "diffusion", "data"):
        assert getattr(both, section) == getattr(demo, section), section
    # the alignment adapters are part of the recipe: the demo's width, on small's UNet
    recipe_unet = dataclasses.replace(small.model.unet, align_adapter_dim=demo.model.unet.align_adapter_dim)
    assert demo.model.unet.align_adapter_dim > 0 and both.loss.align_grad_to_shared == 0.0
    assert both.model.unet == recipe_unet and both.model.image_size == small.model.image_size == 32
    assert both.model.text_encoder.hidden_size == small.model.text_encoder.hidden_size
    assert both.model.text_encoder.tokenizer_kind == demo.model.text_encoder.tokenizer_kind == "word"
