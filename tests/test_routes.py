"""The adapter route, without training: how a spec with `route: [merge, adapter]` plans, how
its cells are judged, chosen and compared, and a LoRA GGUF served on both backends (a
hand-made one: random where a trained adapter would be, or zeroed)."""

from __future__ import annotations

import os
from pathlib import Path

import llama_cpp
import pytest
from conftest import lora_gguf
from ollama_double import OllamaDouble

from harness import chain, sources, spec
from harness.backends import ServeConfig, ollama_answers
from harness.backends.llamacpp import LlamaServer, server_command
from harness.backends.llamacpp_requests import request_body
from harness.backends.ollama import OllamaBackend
from harness.backends.ollama_modelfile import modelfile
from harness.env import ollama_host
from harness.errors import ForgebenchError
from harness.judge import best, evidence, verdict
from harness.plan import cells as planning
from harness.report import recipes, routes
from harness.run.outcomes import CellResult, Outcome
from harness.stages import check
from harness.track import Invocation, RunView

ROOT = Path(__file__).resolve().parents[1]
GGUF = sources.bundled_gguf("smollm2-135m")


@pytest.fixture
def both() -> spec.Spec:
    """The shipped two-route example, with the untuned control cells."""
    loaded = spec.load(ROOT / "experiments" / "quickstart-routes.yaml")
    return loaded.model_copy(update={"control": True})


def by_name(s: spec.Spec) -> dict[str, planning.Cell]:
    return {c.name: c for c in planning.plan(s)}


# --- planning ---------------------------------------------------------------------------


def test_each_lora_x_route_x_level_is_a_cell_and_the_base_cells_are_shared(both):
    cells = by_name(both)
    assert sorted(cells) == sorted(
        f"{line}-{level}"
        for line in ("base", "r16-qkvo", "r16-qkvo-lora", "r16-qkvo-replay", "r16-qkvo-replay-lora")
        for level in ("f16", "q4_k_m", "q2_k")
    )
    for level in ("f16", "q4_k_m", "q2_k"):
        base, lora = cells[f"base-{level}"], cells[f"r16-qkvo-lora-{level}"]
        # the adapter route serves the untuned base's own file at each level
        assert lora.gguf.key == base.gguf.key
        assert "merge" not in lora.calls and lora.model.key == base.model.key
        assert lora.calls["train"].key == cells[f"r16-qkvo-{level}"].calls["train"].key
        # what is measured names the LoRA GGUF: never the base's results
        for stage in ("check", "evaluate", "bench", "drift"):
            if stage in lora.calls:
                assert lora.calls[stage].inputs["adapter"] is lora.lora_gguf
                assert lora.calls[stage].key != base.calls[stage].key
    quantized = [c.calls["quantize"].key for c in cells.values() if "quantize" in c.calls]
    assert len(set(quantized)) == 2 * 3, "2 levels for base (shared by both LoRAs) + 2 x 2 merged"
    assert len({c.lora_gguf.key for c in cells.values() if c.lora_gguf}) == 2


def test_the_merge_route_keys_are_what_they_were(both):
    """Adding the adapter route leaves every merge-route key alone: a store stays valid."""
    merge_only = by_name(both.model_copy(update={"route": ["merge"]}))
    two = by_name(both)
    for name, cell in merge_only.items():
        assert {r: c.key for r, c in cell.calls.items()} == {
            r: c.key for r, c in two[name].calls.items()
        }


def test_a_level_drifts_from_the_f16_of_its_own_route(both):
    cells = by_name(both)
    drift = cells["r16-qkvo-lora-q4_k_m"].calls["drift"]
    assert drift.inputs["reference"].inputs["gguf"].key == cells["base-f16"].gguf.key
    assert drift.inputs["reference"].inputs["adapter"] is cells["r16-qkvo-lora-f16"].lora_gguf
    # the PyTorch model of base + adapter is the merged one, scored once for both routes
    reference = cells["r16-qkvo-f16"].calls["reference"]
    assert cells["r16-qkvo-lora-f16"].calls["reference"].key == reference.key


# --- verdicts, best, the comparison -------------------------------------------------------


def figures(cell: str, route: str, level: str, accuracy: float) -> verdict.Figures:
    items = {"arithmetic": {str(i): i < accuracy * 100 for i in range(100)}}
    return verdict.Figures(
        cell,
        "a",
        level,
        route=route,
        evaluated=True,
        accuracy={"arithmetic": accuracy},
        items=items,
    )


def test_each_route_is_judged_against_its_own_f16():
    """The adapter route's q4 loses nothing against the adapter route's F16, though it is
    far below the merged F16: a route is not blamed for the other route's numbers."""
    cells = [
        figures("a-f16", "merge", "f16", 0.9),
        figures("a-lora-f16", "adapter", "f16", 0.5),
        figures("a-lora-q4_k_m", "adapter", "q4_k_m", 0.5),
    ]
    judged = verdict.judge(cells, spec.BudgetSpec(), {}, ["arithmetic"], [])
    assert not judged["a-lora-q4_k_m"].verdict.startswith("stupid")


def test_an_adapter_that_changes_nothing_is_broken_adapter_not_applied(both):
    cell = by_name(both)["r16-qkvo-lora-f16"]
    reasons = f"{check.NOT_APPLIED} the greedy answers to 3 prompts are the same"
    stages = {
        "check": Outcome(
            "k",
            False,
            1.0,
            {"check_ok": 0, "adapter_applied": 0, "check_template_ok": 1, "check_reasons": reasons},
        )
    }
    result = CellResult(cell.name, "r16-qkvo", "f16", "broken", stages, error=f"check: {reasons}")
    fig = evidence._figures(cell, result, None, [], False)
    judged = verdict.judge([fig], spec.BudgetSpec(), {}, [], [])
    assert judged[cell.name].verdict == "broken (adapter not applied)"


def row(cell: str, route: str, level: str, mb: float, verdict_: str = "ok", **metrics) -> RunView:
    adapter = cell.split("-")[0]
    tags = {
        "forgebench.cell": cell,
        "forgebench.adapter": adapter,
        "forgebench.quant": level,
        "forgebench.route": route,
        "forgebench.status": "done",
        "forgebench.verdict": verdict_,
        "forgebench.primary_task": "arithmetic",
    }
    values = {"gguf_mb": mb, "accuracy_arithmetic": 0.8, **metrics}
    return RunView(cell, cell, "FINISHED", {}, values, tags)


def test_best_names_the_route_and_route_restricts_it():
    rows = [
        row("a-f16", "merge", "f16", 258.0),
        row("a-q4_k_m", "merge", "q4_k_m", 100.0, "stupid (quantization)"),
        row("a-lora-f16", "adapter", "f16", 259.0),
        row("a-lora-q4_k_m", "adapter", "q4_k_m", 101.0),
    ]
    (choice,) = best.choose(rows)
    assert choice.row.cell == "a-lora-q4_k_m" and "q4_k_m by route adapter" in choice.why
    (merged,) = best.choose(rows, route="merge")
    assert merged.row.cell == "a-f16" and "f16 by route merge" in merged.why


def test_the_comparison_pairs_the_routes_on_the_same_items():
    rows = [
        row("a-f16", "merge", "f16", 258.0, time_merge_s=2.0, time_convert_s=6.0),
        row("a-lora-f16", "adapter", "f16", 259.0, time_convert_lora_s=3.0, time_convert_s=6.0),
        row("a-q8_0", "merge", "q8_0", 138.0),
    ]
    samples = {
        "a-f16": {"1": True, "2": True, "3": False, "4": True},
        "a-lora-f16": {"1": True, "2": False, "3": False, "5": True},
    }
    inv = Invocation("x", "sqlite://", "p", {}, rows)
    (pair,) = routes.pairs(inv, lambda r: {"arithmetic": samples[r.cell]})
    t = pair.paired
    assert (t.n, t.lost, t.gained) == (3, 1, 0), "items 1-3 on both: the merged cell alone got 2"
    shown = routes.values(pair)
    assert shown["size"] == "258.0 / 259.0" and shown["build"] == "8.0 / 9.0"
    assert shown["pair"] == "a f16" and shown["paired"].startswith("3 items: 1, 0, +0.33 [")


# --- serving a LoRA GGUF --------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora")
    return {
        "random": lora_gguf(folder / "random.gguf", GGUF),
        "zeroed": lora_gguf(folder / "zeroed.gguf", GGUF, scale=0.0),
    }


@pytest.fixture(scope="module")
def template() -> str:
    vocab = llama_cpp.Llama(model_path=str(GGUF), vocab_only=True, verbose=False)
    return vocab.metadata["tokenizer.chat_template"]


def test_llama_server_gets_the_lora_and_a_request_its_scale(adapters, template):
    config = ServeConfig("forgebench-test/lora", template, adapter=adapters["random"])
    command = server_command(GGUF, config, 8080, Path("t.jinja"))
    assert command[command.index("--lora") + 1] == str(adapters["random"])
    assert "--lora-init-without-apply" not in command, "served alone, its adapter applies"
    hi = [{"role": "user", "content": "hi"}]
    fields = {"lora": [{"id": 1, "scale": 1.0}]}
    assert request_body(hi, config, 8, fields)["lora"] == fields["lora"]
    body = request_body(hi, config, 8, fields, adapter_scale=0.0)
    assert body["lora"] == [{"id": 1, "scale": 0.0}] and body["temperature"] == 0.0
    with pytest.raises(ForgebenchError, match="without an adapter"):
        request_body([], ServeConfig("forgebench-test/x", template), 8, {}, adapter_scale=1.0)


def test_a_shared_server_loads_every_lora_and_applies_none_unasked(adapters, template):
    shared = ServeConfig("forgebench-test/shared", template, adapters=tuple(adapters.values()))
    command = server_command(GGUF, shared, 8080, Path("t.jinja"))
    assert [command[i + 1] for i, a in enumerate(command) if a == "--lora"] == [
        str(path) for path in adapters.values()
    ]
    assert "--lora-init-without-apply" in command
    assert command[command.index("--cache-ram") + 1] == "0", "no prompt cache across adapters"


def test_a_levels_adapter_cells_share_one_server_that_answers_as_each_alone(
    both, adapters, template, tmp_path
):
    """The q4_k_m adapter cells of the two-route example on one llama-server: each cell's
    requests apply its own LoRA only, so its answers are those of a server with that LoRA
    alone (the random one changes the probes, the zeroed one does not); the server stays
    up until the level's last cell is done."""
    from types import SimpleNamespace

    from harness.plan.store import Store
    from harness.run.deployment import Sharing

    store = Store(tmp_path / "store")
    cells = planning.plan(both)
    sharing = Sharing(both, cells, store)
    level = [c for c in cells if c.route == chain.ADAPTER and c.quant == "q4_k_m"]
    names = ["r16-qkvo-lora-q4_k_m", "r16-qkvo-replay-lora-q4_k_m"]
    assert [c.name for c in sharing.group(level[0])] == names
    batches = [[c.name for c in batch] for batch in sharing.batches(cells)]
    assert names in batches
    ran = [name for batch in batches for name in batch]
    assert sorted(ran) == sorted(c.name for c in cells), "each cell once"
    merged = next(c for c in cells if c.route == chain.MERGE)
    assert sharing.group(merged) == [merged], "a merged cell serves alone"
    served = {}
    for cell, lora in zip(level, ("random", "zeroed"), strict=True):
        with store.building(cell.lora_gguf) as out:
            (out / "adapter.gguf").write_bytes(adapters[lora].read_bytes())
        path = store.path(cell.lora_gguf) / "adapter.gguf"
        config = ServeConfig(f"forgebench-test/{cell.name}", template, slots=1, adapter=path)
        served[lora] = SimpleNamespace(cell=cell, adapter=path, config=config, gguf=GGUF)
    try:
        (backend, first), (again, second) = (sharing.deploy(served[n]) for n in served)
        assert again is backend and first.base_url == second.base_url, "one server"
        assert first.details["adapters_loaded"] == 2
        assert first.request_fields["lora"] != second.request_fields["lora"]
        assert first.request_fields["cache_prompt"] is False, "no prefix another adapter made"
        deployments = dict(zip(served, (first, second), strict=True))
        effect = {n: check.adapter_effect(backend, d) for n, d in deployments.items()}
        assert effect["random"]["applied"] and not effect["zeroed"]["applied"], effect
        with LlamaServer() as alone:
            own = check.adapter_effect(alone, alone.deploy(GGUF, served["random"].config))
        assert own == effect["random"], "the same answers as the LoRA served alone"
        sharing.done(level[0])
        assert _alive(first.details["pid"]), "up while a cell of its level is left"
        sharing.done(level[1])
        assert not _alive(first.details["pid"]), "stopped after the level's last cell"
    finally:
        sharing.close()


def test_the_serial_executor_builds_a_levels_adapter_cells_then_serves_them_together(
    both, monkeypatch, tmp_path
):
    """What the serial executor runs, in order: a shared level's cells are built first (so
    its server loads every LoRA GGUF), then served one after another on that `Sharing`,
    which stops the level's server when its last cell is done."""
    from harness.plan.store import Store
    from harness.run import executor
    from harness.run.outcomes import Quiet

    ran: list[tuple[str, str]] = []

    def run_cell(cell, store, reporter, outcomes, executed, served, verify=False):
        ran.append((cell.name, "build" if served is None else "served"))
        assert served is None or served.sharing is not None
        return CellResult(cell.name, cell.adapter, cell.quant, "done", {})

    monkeypatch.setattr(executor, "run_cell", run_cell)
    cells = planning.plan(both)
    results = list(executor.Serial().run(both, cells, Store(tmp_path), Quiet()))
    assert sorted(r.cell for r in results) == sorted(c.name for c in cells), "each cell once"
    served = [name for name, how in ran if how == "served"]
    for level in both.quant:
        group = [f"r16-qkvo-lora-{level}", f"r16-qkvo-replay-lora-{level}"]
        start = ran.index((group[0], "build"))
        assert ran[start : start + 4] == [
            (group[0], "build"),
            (group[1], "build"),
            (group[0], "served"),
            (group[1], "served"),
        ], ran
    assert served.index("r16-qkvo-lora-f16") < served.index("r16-qkvo-lora-q4_k_m"), (
        "a route's F16 before its other levels: they are judged against it"
    )
    assert [name for name, how in ran if how == "build"] == [
        name for name in served if "-lora-" in name
    ], "only the shared cells are built ahead"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_modelfile_names_the_adapter(adapters):
    text = modelfile(GGUF, "{{ .Prompt }}", None, {}, adapters["random"])
    assert text.splitlines()[:2] == [f"FROM {GGUF.resolve()}", f"ADAPTER {adapters['random']}"]


def servers() -> list[str]:
    return ["llamacpp", "ollama-double"] + (
        ["ollama"] if os.environ.get("OLLAMA_HOST") and ollama_answers() else []
    )


@pytest.mark.parametrize("where", servers())
def test_a_lora_changes_the_answers_and_a_zeroed_one_does_not(where, adapters, template):
    """Scale 1 against scale 0 on the check's probes, on each backend: the random LoRA
    changes an answer, the zeroed one none (the check's `adapter not applied`)."""
    for name, changes in (("random", True), ("zeroed", False)):
        config = ServeConfig(
            f"forgebench-test/lora-{name}", template, slots=1, adapter=adapters[name]
        )
        if where == "llamacpp":
            with LlamaServer() as backend:
                effect = check.adapter_effect(backend, backend.deploy(GGUF, config))
            assert effect["applied"] is changes, effect
            continue
        with OllamaDouble() if where == "ollama-double" else _real() as double:
            host = double.host if where == "ollama-double" else ollama_host()
            with OllamaBackend(host) as backend:
                deployment = backend.deploy(GGUF, config)
                try:
                    assert deployment.details["adapters"], "created with its ADAPTER"
                    assert "ADAPTER" in deployment.details["modelfile"]
                    effect = check.adapter_effect(backend, deployment)
                finally:
                    backend.remove(deployment)
                assert not [m for m in backend.deployed() if "lora-" in m], "both removed"
        assert effect["applied"] is changes, effect


class _real:
    """A context for a real server: nothing to start or stop."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_the_double_takes_one_lora_gguf_adapter_as_ollama_does(adapters):
    import ollama

    with OllamaDouble() as double, OllamaBackend(double.host) as backend:
        client = ollama.Client(f"http://{double.host}")
        model = f"sha256:{_upload(client, GGUF)}"
        lora = f"sha256:{_upload(client, adapters['random'])}"
        with pytest.raises(ollama.ResponseError, match="only one adapter"):
            client.create(
                "forgebench-test/two",
                files={"m.gguf": model},
                adapters={"a.gguf": lora, "b.gguf": lora},
            )
        with pytest.raises(ollama.ResponseError, match="not a LoRA GGUF"):
            list(
                client.create(
                    "forgebench-test/model-as-lora",
                    files={"m.gguf": model},
                    adapters={"a.gguf": model},
                    template="{{ .Prompt }}",
                    stream=True,
                )
            )
        assert backend.deployed() == []


def _upload(client, path: Path) -> str:
    from harness.hashing import file_sha256

    client.create_blob(path)
    return file_sha256(path)


def test_every_lm_eval_request_carries_the_deployments_fields():
    """lm-eval's requests to a shared server pick the cell's adapter, as the chat ones do."""
    from harness.stages.evaluate import model_args, watched_model

    fields = {"lora": [{"id": 1, "scale": 1.0}], "cache_prompt": False}
    model = watched_model(model_args("http://127.0.0.1:9/v1", "m", 2), lambda: None, fields)
    payload = model._create_payload(
        [{"role": "user", "content": "What is 2 + 2?"}], generate=True, gen_kwargs={}
    )
    assert payload["lora"] == fields["lora"] and payload["cache_prompt"] is False
    assert payload["messages"][0]["content"] == "What is 2 + 2?"


def test_a_recipe_is_set_beside_its_plain_level_and_best_walks_it_before_its_level():
    """The report pairs q2_k-imat-train with q2_k of the same adapter and route on the items
    both scored; `best` walks a level's recipes just before the plain level, so a plain q2_k
    that lost accuracy stops the walk after the recipe that held."""
    rows = [
        row("a-f16", "merge", "f16", 258.0),
        row("a-q4_k_m", "merge", "q4_k_m", 100.0, kld_mean=0.05),
        row("a-q2_k", "merge", "q2_k", 60.0, "stupid (quantization)", kld_mean=0.9),
        row("a-q2_k-imat-train", "merge", "q2_k-imat-train", 61.0, kld_mean=0.4),
    ]
    samples = {
        "a-q2_k": {"1": False, "2": False, "3": True},
        "a-q2_k-imat-train": {"1": True, "2": True, "3": True},
    }
    inv = Invocation("x", "sqlite://", "p", {}, rows)
    side = recipes.section(inv, lambda r: {"arithmetic": samples.get(r.cell, {})})
    (shown,) = side.rows
    assert shown["pair"] == "a q2_k-imat-train"
    assert shown["kld"] == "0.9000 / 0.4000" and shown["size"] == "60.0 / 61.0"
    assert shown["paired"].startswith("3 items: 0, 2, -0.67 [")
    (choice,) = best.choose(rows)
    assert choice.row.cell == "a-q2_k-imat-train", choice.why
