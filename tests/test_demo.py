"""The demo pipeline end to end at toy budgets: tokenizers, both unified models, bundles, eval, report."""

import json

import pytest

from anymodal.commands.demo import DemoSettings, run_demo


@pytest.mark.parametrize("lanes", [True, False], ids=["two-lanes", "one-after-another"])
def test_demo_runs_every_stage_and_writes_the_report(tmp_path, monkeypatch, lanes):
    monkeypatch.chdir(tmp_path.parent)  # runs write under the given out folder only
    out = tmp_path / "demo"
    report = run_demo(DemoSettings(out=str(out), vqvae_steps=2, vae_steps=2, chameleon_steps=2, transfusion_steps=2,
                                   model_size="debug", n=2, tokenizer_eval_images=8, steps=2, recipe_root=None,
                                   lanes=lanes))
    assert report == out / "report.html" and report.is_file()
    html = report.read_text()
    for piece in ("t2i_exact", "transfusion", "chameleon", "shapes-vqvae", "shapes-vae", "data:image/png;base64",
                  "checker read:",  # two training steps draw no right scene; the report says what it read
                  "<span class='kind'>edit: "):  # edits per kind, under edit_exact
        assert piece in html
    for name in ("chameleon", "transfusion"):
        assert (out / name / "model.safetensors").is_file()
        scores = json.loads((out / f"{name}-scores.json").read_text())["scores"]
        assert set(scores) == {"seen", "heldout", "all"} and scores["all"]["n_t2i"] == 2 + 1
        kinds = [scores["all"][f"edit_exact_{k}"] for k in ("recolor", "move", "remove", "add")]
        assert sum(v == v for v in kinds) >= 1  # the 3 edits' kinds are scored (NaN: no edit of that kind)
    assert (out / "overview.png").is_file()
    timings = json.loads((out / "timings.json").read_text())
    stages = [f"{verb} {name}" for verb, name in (("train", "shapes-vae"), ("train", "shapes-vqvae"),
              ("train", "transfusion"), ("train", "chameleon"), ("evaluate", "transfusion"), ("evaluate", "chameleon"))]
    assert {k.split(" (")[0] for k in timings} == {"total", *stages}
    trained = [k for k in timings if k.startswith("train ")]  # each training stage says its steps
    assert len(trained) == 4 and all(k.endswith(", 2 steps)" if lanes else "(2 steps)") for k in trained), trained
    if lanes:  # each lane's log holds its stages, in order
        log = (out / "logs" / "continuous.log").read_text()
        assert log.index("=== stage train shapes-vae") < log.index("=== stage train transfusion") < \
            log.index("=== stage evaluate transfusion")
    else:
        assert not (out / "logs").exists()


def test_auto_precision_picks_bf16_only_where_it_measures_faster(monkeypatch):
    import torch

    from anymodal import hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # an emulating CPU; AMD Zen 5 (matmuls faster, small convolutions not); an AMX Xeon (both faster)
    for matmul, conv, expected in ((0.5, 0.6, (None, None)), (4.5, 0.9, ("bf16-mixed", None)),
                                   (4.8, 3.0, ("bf16-mixed", "bf16-mixed"))):
        monkeypatch.setattr(hardware, "_bf16_speedup", {})
        monkeypatch.setattr(hardware, "matmul_rate", lambda dtype, r=matmul: r if dtype == torch.bfloat16 else 1.0)
        monkeypatch.setattr(hardware, "conv_rate", lambda dtype, r=conv: r if dtype == torch.bfloat16 else 1.0)
        assert (hardware.resolve_precision("auto"), hardware.resolve_precision("auto", "conv")) == expected
    assert hardware.resolve_precision("32-true") == "32-true"  # None above keeps the recipe's 32-true


def test_the_budget_is_shared_out_to_each_lanes_training_stages():
    from anymodal.commands import demo
    from anymodal.commands.lanes import Stage

    def lane(*kinds):
        return [Stage(name, demo.evaluate_model, {}, weight, reserve) for name, weight, reserve in kinds]

    train_tok = ("train tokenizer", demo.TOKENIZER_WEIGHT, 0.0)
    train_model = ("train model", demo.MODEL_WEIGHT, 0.0)
    evaluate = ("evaluate", 0.0, demo.EVAL_RESERVE_S)
    two = lane(train_tok, train_model, evaluate)  # a lane: 40% of its training time to the tokenizer
    demo.plan_deadlines(two, start=100.0, seconds=1000.0)
    training = 1000.0 - demo.REPORT_RESERVE_S - demo.EVAL_RESERVE_S
    assert [s.kwargs.get("deadline") for s in two] == pytest.approx([100 + training * 0.4, 100 + training, None])
    one = lane(train_tok, train_tok, train_model, train_model, evaluate, evaluate)  # no lanes: all in order
    demo.plan_deadlines(one, start=0.0, seconds=1000.0)
    training = 1000.0 - demo.REPORT_RESERVE_S - 2 * demo.EVAL_RESERVE_S
    assert [s.kwargs["deadline"] for s in one[:4]] == pytest.approx([training * f for f in (0.2, 0.4, 0.7, 1.0)])
    with pytest.raises(ValueError, match="leaves no time to train"):
        demo.plan_deadlines(lane(train_model, evaluate), start=0.0, seconds=60.0)


def test_demo_command_passes_each_tokenizers_precision(monkeypatch):
    from anymodal.commands import cli

    seen = []
    monkeypatch.setattr(cli, "run_demo", seen.append)
    cli.main(["demo", "--vae-precision", "32-true", "--vqvae-precision", "bf16-mixed", "--minutes", "0"])
    assert (seen[0].vae_precision, seen[0].vqvae_precision, seen[0].minutes) == ("32-true", "bf16-mixed", None)
    cli.main(["demo"])
    assert (seen[1].vae_precision, seen[1].vqvae_precision) == ("auto", "auto")
