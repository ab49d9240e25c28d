"""The tied head's initial scale, and the divergence rule telling a bad start from a divergence."""

import math

import pytest
import torch

from analysis.testbed.corpus import load_corpus
from analysis.testbed.model import ModelConfig, build_model
from analysis.training.status import divergence_reason, initial_loss_note, next_loss_ema
from analysis.training.train import TrainConfig, train_run

LN_V = math.log(256)
PROSE = ("Before we proceed any further, hear me speak. Speak, speak. You are all resolved rather "
         "to die than to famish? Resolved. resolved. First, you know Caius Marcius is chief enemy "
         "to the people. We know't, we know't. Let us kill him, and we'll have corn at our own "
         "price. Is't a verdict? No more talking on't; let it be done: away, away!\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text(PROSE * 60)
    return load_corpus(path)


def cpu_shape(**kw):  # nanoGPT's CPU shape for shakespeare_char: 4 blocks, width 128
    return ModelConfig(scheme="pre", depth=4, width=128, heads=4, max_seq_len=64, **kw)


def test_tied_initial_loss_is_near_a_uniform_guess(corpus):
    x, y = corpus.batch("train", 8, 64, generator=torch.Generator().manual_seed(0))
    tied, untied = build_model(cpu_shape(tie_embeddings=True)), build_model(cpu_shape())
    assert tied.head.weight is tied.tok_embed.weight
    # the embedding keeps its scale (the theory's q0 = embed_std²): only the readout is scaled
    assert tied.tok_embed.weight.std().item() == pytest.approx(1 / math.sqrt(2), rel=0.02)
    assert tied.output_mult == pytest.approx(1 / math.sqrt(128)) and untied.output_mult == 1.0
    with torch.no_grad():
        loss = tied(x, y)[1].item()
        random_targets = tied(x, torch.randint(0, 256, y.shape))[1].item()
    assert 0.8 * LN_V < loss < 1.5 * LN_V, loss  # was ~32 nats before the 1/√width readout
    assert abs(random_targets - LN_V) < 0.5 * LN_V, random_targets
    assert not initial_loss_note(loss, 256, 3.0)


def test_a_tiny_tied_run_trains(corpus, tmp_path):
    tc = TrainConfig(tokens=64 * 8 * 48, batch_size=8, lr=1e-2, evals=1, eval_batches=1,
                     warmup_frac=0.05)
    mc = ModelConfig(scheme="pre", depth=2, width=64, heads=4, max_seq_len=64, tie_embeddings=True)
    r = train_run(mc, tc, corpus, tmp_path / "tied", log=lambda m: None)
    losses = [v for _, v in r["train_loss"]]
    assert r["status"] == "ok" and not r["diverged"] and r["initial_loss_note"] == ""
    assert losses[0] < 1.5 * LN_V
    assert math.fsum(losses[-5:]) / 5 < 0.75 * losses[0], losses


def judge(losses, vocab=256, spike_factor=3.0, spike_after=20):
    """Run the divergence rule over a loss sequence as the training loop does: (step, reason) of
    the first divergence, or None."""
    ema = None
    for step, value in enumerate(losses):
        reason = divergence_reason(step, value, ema, vocab, spike_factor, spike_after,
                                   initial=losses[0])
        ema = next_loss_ema(ema, value)
        if reason:
            return step, reason
    return None


def test_a_run_that_starts_high_and_falls_is_not_diverged():
    losses = [32.179 * 0.8 ** s + 2.0 for s in range(60)]  # the untamed tied head's start, falling
    assert judge(losses) is None
    note = initial_loss_note(losses[0], 256, 3.0)
    assert "initial loss 34.179 nats" in note and "16.636" in note
    # the first loss alone never ends a run unless it is not finite
    assert divergence_reason(0, 500.0, None, 256, 3.0, 20) == ""
    assert divergence_reason(0, math.nan, None, 256, 3.0, 20) == "loss nan at step 0"
    # a sane start has nothing to report
    assert initial_loss_note(5.6, 256, 3.0) == "" and initial_loss_note(math.nan, 256, 3.0) == ""


def test_a_run_that_blows_up_is_diverged():
    # from a sane start: above 3 × ln V before the running mean counts
    step, reason = judge([5.5, 5.0, 4.2, 3.5, 40.0, 80.0])
    assert step == 4 and "above 3.0 × ln(vocab) = 16.636" in reason
    assert judge([5.5, 5.0, 16.0]) is None
    # from a high start: above 3 × the run's own first loss
    step, reason = judge([30.0, 25.0, 20.0, 95.0])
    assert step == 3 and "3.0 × the run's first loss 30.000 = 90.000" in reason
    # later: a spike above 3 × the running mean
    step, reason = judge([5.5 - 0.1 * s for s in range(25)] + [12.0])
    assert step == 25 and "running mean" in reason
    # or a non-finite loss
    step, reason = judge([5.5, 5.0, math.inf])
    assert step == 2 and reason == "loss inf at step 2"


def test_train_run_reports_an_absurd_first_loss_and_goes_on(corpus, tmp_path, monkeypatch):
    import analysis.testbed.model as model_mod
    real = model_mod.Testbed.__init__

    def untamed(self, cfg, scheme=None):  # the tied head without its 1/√width readout
        real(self, cfg, scheme)
        self.output_mult = 1.0
    monkeypatch.setattr(model_mod.Testbed, "__init__", untamed)
    said = []
    tc = TrainConfig(tokens=32 * 4 * 12, batch_size=4, lr=3e-3, evals=1, eval_batches=1)
    mc = ModelConfig(scheme="pre", depth=1, width=128, heads=4, max_seq_len=32, tie_embeddings=True)
    r = train_run(mc, tc, corpus, tmp_path / "untamed", log=said.append)
    losses = [v for _, v in r["train_loss"]]
    assert r["first_train_loss"] > 3 * LN_V  # the ~30-nat start of the issue, at step 0
    assert r["status"] != "diverged", r["divergence_reason"]  # it was "diverged at step 0"
    assert losses[-1] < losses[0] / 3, losses  # it falls
    assert r["initial_loss_note"].startswith(f"initial loss {r['first_train_loss']:.3f} nats")
    assert any("initial loss" in line for line in said)
