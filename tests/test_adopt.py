"""Adapters forgebench did not train (`lora: [{name, path}]`) and training that continues
from an earlier adapter (`lora: [{name, resume_from}]`).

An adapter saved by a plain peft script goes through the real chain on both routes (peft's
merge, llama.cpp's converters, llama-server, lm-eval) as a trained one would, and what is
served is that adapter: the merged weights are the base plus its own low-rank update. One
made for another base is refused in one line naming the tensor. A continued training starts
from its parent's weights, is keyed by the parent's content, and MLflow names the parent.
None of this needs a model that can add: it runs on the suite's tiny model (conftest's
`tiny_base`). The gate on an adopted adapter, on SmolLM2, is in test_release_gate.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import scratch
from mlflow.tracking import MlflowClient
from safetensors.numpy import save_file
from typer.testing import CliRunner

from harness import spec as specs
from harness.cli import app
from harness.data import hygiene
from harness.errors import StageError
from harness.hashing import digest
from harness.plan import cells as planning
from harness.sources import adapters

SPEC = """\
name: {name}
base: {{path: "{base}"}}
data: {{task: arithmetic, n_train: 48, n_eval: 16, seed: 5}}
train: {{epochs: 1, lr: {lr}, batch_size: 8, max_seq_len: 128, seed: 0}}
lora:
  - {lora}
quant: [{quant}]
route: [{route}]
control: false
measure: [{measure}]
serve: {{backend: llamacpp}}
evaluate: {{tasks: [arithmetic], limit: 8}}
budgets: {{tolerance: 0.5}}
tracking: {{uri: "sqlite:///{db}"}}
"""


def write_spec(folder: Path, name: str, lora: str, **fields) -> Path:
    values = {"lr": "3.0e-4", "quant": "f16", "route": "merge", "measure": ""} | fields
    path = folder / f"{name}.yaml"
    path.write_text(
        SPEC.format(name=name, base=folder / "base", lora=lora, db=folder / "mlflow.db", **values)
    )
    return path


def peft_script(base: Path, out: Path, seed: int = 1) -> Path:
    """What a user's own training script leaves: peft's save_pretrained of a LoRA on q_proj
    and v_proj, with lora_B set from a seed (a trained adapter's is non-zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    return out


def lora_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(folder / "adapter_model.safetensors")


# --- the adapter folder, read without a model ---------------------------------------


def fake_adapter(folder: Path, width: int = 256, r: int = 4, **config) -> Path:
    folder.mkdir(parents=True)
    settings = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (folder / adapters.CONFIG).write_text(json.dumps(settings | config))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{key}.lora_A.weight": np.zeros((r, width), np.float32),
            f"{key}.lora_B.weight": np.ones((width, r), np.float32),
        },
        folder / "adapter_model.safetensors",
    )
    return folder


BASE = {"model.layers.0.self_attn.q_proj.weight": (256, 256), "model.embed_tokens.weight": (9, 256)}


def test_an_adapter_that_fits_the_base_has_no_misfit(tmp_path):
    adapter = adapters.read(fake_adapter(tmp_path / "a"))
    assert adapters.misfit(adapter, adapters.tensor_shapes(adapter.weights), BASE) is None


def test_an_adapter_of_another_width_names_its_first_misfit_tensor(tmp_path):
    adapter = adapters.read(fake_adapter(tmp_path / "a", width=128))
    why = adapters.misfit(adapter, adapters.tensor_shapes(adapter.weights), BASE)
    assert why == (
        "its tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight is "
        "[4, 128] where this base's model.layers.0.self_attn.q_proj.weight takes [r, 256]"
    )


def test_an_adapter_for_modules_the_base_lacks_says_which():
    shapes = {"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": (4, 256)}
    adapter = adapters.Adapter(Path("."), 4, 8, ("q_proj",), "none", "x", Path("w"), False, ())
    why = adapters.misfit(adapter, shapes, BASE)
    assert why is not None and "model.layers.7.self_attn.q_proj, which this base has no" in why


def test_an_adopted_adapter_is_keyed_by_its_content_not_its_folder(tmp_path):
    fake_adapter(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")

    def adopt_key(folder: str) -> str:
        path = tmp_path / f"{folder}.yaml"
        path.write_text(
            "name: k\nbase: {model: smollm2-135m}\ndata: {task: arithmetic}\n"
            f"lora:\n  - {{name: x, path: {folder}}}\nquant: [f16, q8_0]\n"
        )
        cells = planning.plan(specs.load(path))
        assert all("train" not in cell.calls for cell in cells if cell.lora)
        return next(cell.calls["adopt"].key for cell in cells if cell.lora)

    assert adopt_key("one") == adopt_key("two")
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 256))},
        tmp_path / "two" / "adapter_model.safetensors",
    )
    assert adopt_key("one") != adopt_key("two")


def night(store: Path, key: str, rows: list[dict], parent: Path | None = None) -> Path:
    """What a forgebench night leaves in the store: its adapter beside a manifest that
    names the data it trained on (and the adapter it continued)."""
    data = store / f"{key}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    folder = store / "train" / key
    (folder / "adapter").mkdir(parents=True)
    settings = {
        "data": {"train": str(data), "train_sha256": digest(data)},
        "lora": {"resume_from": str(parent)} if parent else {},
    }
    (folder / "manifest.json").write_text(json.dumps({"settings": settings}))
    return folder / "adapter"


def row(prompt: str, answer: str) -> dict:
    return {"prompt": prompt, "completion": answer}


def test_rows_trained_on_in_earlier_nights_are_counted_back_to_the_first(tmp_path):
    first = night(tmp_path, "n1", [row("Reset my password", "Go to settings.")])
    second = night(tmp_path, "n2", [row("Cancel my order", "Done.")], parent=first)
    tonight = [
        [
            {"role": "user", "content": "reset  my PASSWORD"},
            {"role": "assistant", "content": "go to settings."},
        ],
        [{"role": "user", "content": "Cancel my order"}, {"role": "assistant", "content": "Done."}],
        [{"role": "user", "content": "Track my parcel"}, {"role": "assistant", "content": "Here."}],
    ]
    assert hygiene.seen_before(tonight, second) == 2
    (tmp_path / "n1.jsonl").write_text(json.dumps(row("edited", "since")) + "\n")
    assert hygiene.seen_before(tonight, second) == 1  # night 1's data is no longer known
    assert hygiene.seen_before(tonight, tmp_path / "elsewhere" / "adapter") is None


# --- through the real chain on the tiny model ---------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_base):
    with scratch(tmp_path_factory, "adopt") as out:
        (out / "base").symlink_to(tiny_base, target_is_directory=True)
        yield out


def built(store: Path, stage: str) -> list[Path]:
    """The stage's finished outputs in the store (not its lock files)."""
    return sorted(p for p in (store / stage).iterdir() if (p / "manifest.json").is_file())


def run(spec: Path, store: Path):
    return CliRunner().invoke(app, ["run", str(spec), "--store", str(store)])


def cell_runs(folder: Path, experiment: str) -> dict[str, object]:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        "tags.`forgebench.kind` = 'cell'",
    )
    return {run.data.tags["forgebench.cell"]: run for run in found}


@pytest.mark.slow
def test_a_peft_adapter_trained_elsewhere_is_served_on_both_routes(folder, tiny_base):
    """Merged, it is the base plus (alpha / r) B A in every targeted weight; beside the base
    GGUF, it is converted by llama.cpp's LoRA converter; both cells are scored by lm-eval."""
    from safetensors.torch import load_file

    adapter = peft_script(tiny_base, folder / "from-a-script")
    spec = write_spec(
        folder,
        "adopted",
        f'{{name: ext, path: "{adapter}"}}',
        quant="q8_0",
        route="merge, adapter",
        measure="evaluate",
    )
    store = folder / "store"
    result = run(spec, store)
    assert result.exit_code == 0, result.output

    runs = cell_runs(folder, "adopted")
    assert sorted(runs) == ["ext-lora-q8_0", "ext-q8_0"]
    for run_ in runs.values():
        assert run_.data.tags["forgebench.status"] == "done", run_.data.tags
        assert run_.data.params["lora.path"] == str(adapter)
        assert "train.lr" not in run_.data.params  # nothing was trained
        assert "accuracy_arithmetic" in run_.data.metrics
    assert not (store / "train").exists()
    [adopted] = built(store, "adopt")
    assert json.loads((adopted / "source.json").read_text())["path"] == str(adapter)

    [merged] = built(store, "merge")
    weights = load_file(merged / "model" / "model.safetensors")
    base = load_file(tiny_base / "model.safetensors")
    pair = lora_tensors(adapter)
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    update = pair[f"{prefix}.lora_B.weight"] @ pair[f"{prefix}.lora_A.weight"] * (8 / 4)
    name = "model.layers.1.self_attn.v_proj.weight"
    assert np.abs(update).max() > 1e-3  # the adapter changes the weight at all
    np.testing.assert_allclose(weights[name].numpy(), base[name].numpy() + update, atol=1e-5)


@pytest.mark.slow
def test_an_adapter_for_another_base_is_refused_in_one_line(folder, tiny_base):
    from harness.stages import adopt

    other = fake_adapter(folder / "for-a-wider-base", width=576)
    inputs = folder / "resolved"
    (inputs / "model").mkdir(parents=True)
    for file in tiny_base.iterdir():
        (inputs / "model" / file.name).symlink_to(file)
    out = folder / "adopt-out"
    out.mkdir()
    with pytest.raises(StageError) as refused:
        settings = {"adapter": str(other), "trust_remote_code": False}
        adopt.run(settings, {"base": inputs}, out, lambda *_: None)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"the adapter in {other} was not trained on this base: its ")
    assert "is [4, 576] where this base's model.layers.0.self_attn.q_proj.weight" in message
    assert not (out / "adapter").exists()


@pytest.mark.slow
def test_training_continues_from_an_earlier_adapter(folder):
    """Night 2 starts from night 1's weights: at a learning rate too small to move them, the
    continued adapter is night 1's (a fresh one would have lora_B at zero). Its key follows
    the parent's content, and MLflow names the parent's stage key."""
    store = folder / "store-nights"
    night1 = write_spec(folder, "night1", "{name: n, r: 4, alpha: 8, target_modules: [q_proj]}")
    assert run(night1, store).exit_code == 0
    [parent_dir] = built(store, "train")
    parent = parent_dir / "adapter"

    night2 = write_spec(folder, "night2", f'{{name: n, resume_from: "{parent}"}}', lr="1.0e-9")
    result = run(night2, store)
    assert result.exit_code == 0, result.output
    [child_dir] = [p for p in built(store, "train") if p != parent_dir]
    before, after = lora_tensors(parent), lora_tensors(child_dir / "adapter")
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        np.testing.assert_allclose(after[key], value, atol=1e-6)
    assert any(np.abs(v).max() > 1e-4 for k, v in after.items() if "lora_B" in k)

    [cell] = cell_runs(folder, "night2").values()
    assert cell.data.params["lora.resume_from_key"] == f"train/{parent_dir.name}"
    assert cell.data.metrics["train_rows_seen_before"] == 48  # night 1's data, all of it
    assert cell.data.tags["forgebench.key.train"] == child_dir.name

    # a rerun builds nothing
    assert run(night2, store).exit_code == 0
    assert len(built(store, "train")) == 2
