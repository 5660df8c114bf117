"""Search spaces (every registered one) and the searcher's reporting to Optuna, on real Optuna studies."""

from __future__ import annotations

import dataclasses
import pickle

import optuna
import pytest

from search_spaces import SPACES
from study.search import SweepSpace, config_keys, make_sampler, method_param_name, param_name
from trainables.config import TrialConfig
from trainables.hparams import ConfigError
from trainables.methods import METHODS


def test_every_method_has_a_space():
    assert set(SPACES) == set(METHODS)


@pytest.mark.parametrize("method", list(SPACES))
def test_random_draws_give_valid_configs(method):
    space = SweepSpace([method], {})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1), directions=["maximize", "minimize"])
    for _ in range(20):
        trial = study.ask()
        constants = space(trial)
        cfg = TrialConfig.from_flat({**constants})
        assert cfg.method == method
        study.tell(trial, [0.5, 1.0])


def test_fixed_keys_are_not_searched():
    fixed = {"model.depth": 56, "model.weights": "independent", "model.exit_weights": [0.5] * 27}
    space = SweepSpace(["elastic"], fixed)
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    constants = space(trial)
    searched = config_keys(trial.params)
    assert not any(k.startswith(("model.depth", "model.weights", "model.exit_weights")) for k in searched)
    cfg = TrialConfig.from_flat({**fixed, **constants})
    assert cfg.model.depth == 56 and cfg.model.exit_weights == (0.5,) * 27


def test_several_methods_make_the_method_the_first_choice():
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    out = SweepSpace(["resnet", "elastic"], {})(trial)
    assert list(trial.params)[0] == "method[resnet,elastic]" == method_param_name(["resnet", "elastic"])
    assert out["method"] == trial.params["method[resnet,elastic]"] == config_keys(trial.params)["method"]
    # every other parameter is named per method: one study may hold several methods with different choices
    assert all(name.startswith(out["method"] + ":") for name in list(trial.params)[1:])


def test_fixed_trial_replays_a_config():
    # model.backbone, policy.name: one-value parameters every elastic trial records (search_spaces/elastic.py).
    params = {"model.backbone": "cifar_resnet", "model.depth": 32, "model.weights": "uniform",
              "model.head_dropout": 0.1, "policy.name": "confidence", "policy.threshold": 0.9, "optim.lr": 0.1,
              "optim.weight_decay": 5e-4, "optim.label_smoothing": 0.0}
    trial = optuna.trial.FixedTrial({param_name("elastic", k): v for k, v in params.items()})
    constants = SweepSpace(["elastic"], {})(trial)
    cfg = TrialConfig.from_flat({**params, **constants})
    assert cfg.model.depth == 32 and cfg.policy.threshold == 0.9


def test_unknown_sampler():
    with pytest.raises(ConfigError, match="unknown sampler 'cmaes'; valid samplers: tpe, nsga2, random"):
        make_sampler("cmaes", 0)


@pytest.mark.parametrize("name", ["tpe", "nsga2", "random"])
def test_every_sampler_survives_pickling_and_samples_as_before(name):
    """Tune saves the searcher, sampler included, with the sweep's state (Optuna 5.1's NSGA-II holds a lock)."""
    import pickle

    def draws(sampler, n=12):
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        for _ in range(n):
            t = study.ask()
            x, y = t.suggest_float("x", 0, 1), t.suggest_categorical("c", ["a", "b", "c"])
            study.tell(t, [x, (y == "a") + x])
        return [t.params for t in study.trials]

    sampler = make_sampler(name, seed=3, concurrency=2)
    assert draws(pickle.loads(pickle.dumps(sampler))) == draws(make_sampler(name, seed=3, concurrency=2))


def test_nsga2_population_is_sized_to_the_sweep_unless_given():
    """Optuna's fixed 50 makes a 100-trial sweep two generations; the platform's default is ten generations."""
    from study.runner import SweepSpec
    from study.search import nsga2_population

    assert [nsga2_population(n) for n in (1, 40, 100, 250, 1000, 10_000)] == [4, 4, 10, 25, 50, 50]
    assert nsga2_population(100, population=30) == 30
    assert make_sampler("nsga2", 0, trials=100).population_size == 10
    assert make_sampler("nsga2", 0, trials=100, population=7).population_size == 7
    assert make_sampler("nsga2", 0).population_size == 50  # no budget known: Optuna's own

    def spec(sampler, population=None):
        return SweepSpec(study="s", methods=("nb201",), trials=100, fixed={}, results_dir="/r", tracking_uri="",
                         storage="", sampler=sampler, population=population)
    # the sweep run records the population NSGA-II runs with; other samplers have none
    assert spec("nsga2").summary()["population"] == 10 and spec("nsga2", 6).summary()["population"] == 6
    assert "population" not in spec("tpe").summary()


def test_searcher_tells_optuna_what_happened(tmp_path):
    from study.searcher import StudySearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db")
    s = StudySearch(space=SweepSpace(["resnet"], {}), metric=["val_acc", "macs"], mode=["max", "min"],
                    storage=storage, study_name="s", sampler=make_sampler("random", 0))
    for tid in "abcd":
        assert s.suggest(tid)["method"] == "resnet"
    common = {"mlflow_run_id": "r", "config_hash": "h", "method": "resnet", "val_acc": 0.5, "macs": 4e7}
    s.on_trial_complete("a", {**common, "final": 1, "epoch": 3})
    s.on_trial_complete("b", {**common, "final": 0, "epoch": 1})
    s.on_trial_complete("c", {**common, "final": 0, "diverged": 1, "fail_reason": "loss is nan"})
    s.on_trial_complete("d", None, error=True)
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]
    assert trials[0].values == [0.5, 4e7] and trials[0].user_attrs["mlflow_run_id"] == "r"
    assert trials[1].user_attrs["stopped_at_epoch"] == 1 and trials[1].user_attrs["val_acc_at_stop"] == 0.5
    assert trials[2].user_attrs["fail_reason"] == "loss is nan"


def test_validation_uses_the_space_not_the_fixed_keys_alone(tmp_path):
    from study.runner import SweepSpec, fixed_for, validate

    def spec(methods, fixed):
        return SweepSpec(study="s", methods=methods, trials=1, fixed=fixed, results_dir=tmp_path,
                         tracking_uri=f"sqlite:///{tmp_path}/m.db", storage=f"sqlite:///{tmp_path}/o.db")

    # The independent weights are searched, so fixing only the scheme is valid.
    plan = validate(spec(("elastic",), {"data.dataset": "synthetic", "data.val_size": 100,
                                        "model.weights": "independent"}))
    assert all(c.model.weights == "independent" and len(c.model.exit_weights) > 0 for c in plan.probes)
    assert plan.existing_trials == 0 and not list(tmp_path.iterdir())
    # A model key of one method applies to that method only; a key no method has is still an error.
    fixed = {"data.dataset": "synthetic", "data.val_size": 100, "model.head_dropout": 0.1}
    validate(spec(("resnet", "elastic"), fixed))
    assert "model.head_dropout" not in fixed_for("resnet", fixed, ["resnet", "elastic"])
    assert fixed_for("elastic", fixed, ["resnet", "elastic"])["model.head_dropout"] == 0.1
    with pytest.raises(ConfigError, match="unknown config key 'model.nope'"):
        validate(spec(("resnet", "elastic"), {**fixed, "model.nope": 1}))


def test_close_unfinished_leaves_no_running_trial(tmp_path):
    from study.searcher import StudySearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db")
    s = StudySearch(space=SweepSpace(["resnet"], {}), metric=["val_acc", "macs"], mode=["max", "min"],
                    storage=storage, study_name="s", sampler=make_sampler("random", 0))
    s.suggest("a"), s.suggest("b")
    s.on_trial_complete("a", {"val_acc": 0.5, "macs": 1.0, "final": 1})
    assert s.close_unfinished("interrupted") == 1
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[1].user_attrs["fail_reason"] == "interrupted"


def _searcher(storage, ask_ahead, max_asks=None, space=None, sampler="random"):
    from study.searcher import StudySearch

    return StudySearch(space=space or SweepSpace(["resnet"], {}), metric=["val_acc", "macs"], mode=["max", "min"],
                       storage=storage, study_name="s", sampler=make_sampler(sampler, 0), ask_ahead=ask_ahead,
                       max_asks=max_asks, sweep_run_id="sweep")


DONE = {"val_acc": 0.5, "macs": 1.0, "final": 1}


def test_asking_ahead_hands_over_the_same_configurations_and_asks_none_beyond_the_sweep(tmp_path):
    """With a sampler that does not learn, asking ahead changes nothing but when: the same configurations, in the
    same order, and no Optuna trial beyond the sweep's `max_asks`."""
    configs = {}
    for mode in ("off", "on"):
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/{mode}.db")
        s = _searcher(storage, mode, max_asks=4)
        configs[mode] = [s.suggest(tid) for tid in "ab"]
        s.on_trial_complete("a", DONE)
        configs[mode] += [s.suggest(tid) for tid in "cd"]
        for tid in "bcd":
            s.on_trial_complete(tid, DONE)
        assert s.asked_ahead == (3 if mode == "on" else 0)
        assert s.seconds["suggest"] > 0 and (s.seconds["ahead"] > 0) == (mode == "on")
        trials = optuna.load_study(study_name="s", storage=storage).get_trials()
        assert [t.state.name for t in trials] == ["COMPLETE"] * 4
        assert [t.user_attrs["tune_trial_id"] for t in trials] == list("abcd")
    assert configs["on"] == configs["off"]


def test_a_configuration_asked_ahead_and_never_run_is_closed(tmp_path):
    """A sweep stopped early leaves its ask ahead FAIL with its reason; the searcher still pickles and saves with
    one pending (Tune does both), and a sweep resumed from that save closes the pending one too."""
    from study.searcher import AHEAD_REASON, StudySearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db")
    s = _searcher(storage, "on")
    s.suggest("a")
    s.on_trial_complete("a", DONE)
    assert s.close_unfinished("interrupted") == 1
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[1].user_attrs["fail_reason"] == AHEAD_REASON

    s = _searcher(optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/r.db"), "on")
    s.suggest("a")  # and one asked ahead, pending
    pickle.loads(pickle.dumps(s))
    s.save(str(tmp_path / "searcher.pkl"))
    resumed = StudySearch(space=SweepSpace(["resnet"], {}), metric=["val_acc", "macs"], mode=["max", "min"])
    resumed.restore(str(tmp_path / "searcher.pkl"))
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/r.db").get_trials()
    assert [t.state.name for t in trials] == ["RUNNING", "FAIL"]
    assert trials[1].user_attrs["fail_reason"] == AHEAD_REASON


def test_an_ask_ahead_that_fails_closes_its_trial_and_raises_at_the_next_suggest():
    calls = []

    def space(trial):
        calls.append(trial.number)
        if len(calls) == 2:  # the ask ahead, in its thread
            raise ValueError("no such value")
        trial.suggest_float("x", 0.0, 1.0)

    s = _searcher(optuna.storages.InMemoryStorage(), "on", space=space)
    s.suggest("a")
    with pytest.raises(ValueError, match="no such value"):
        s.suggest("b")
    trials = s._ot_study.get_trials()
    assert [t.state.name for t in trials] == ["RUNNING", "FAIL"]
    assert trials[1].user_attrs["fail_reason"] == "asked for ahead; sampling failed: ValueError: no such value"
    assert s.close_unfinished("interrupted") == 1
    assert [t.state.name for t in s._ot_study.get_trials()] == ["FAIL", "FAIL"]


def test_auto_asks_ahead_only_where_the_ask_is_a_real_share_of_a_trial():
    """`auto`: no ask ahead before the searcher has the results of `ahead_after` trials (AHEAD_AFTER, here 1 to
    keep the test short); then one when an ask costs at least AHEAD_SHARE of a trial (here a slow space and
    instant trials), none when it does not (a fast space and trials of 0.5 s)."""
    import time

    from study.searcher import AHEAD_AFTER

    s = _searcher(optuna.storages.InMemoryStorage(), "auto")
    assert s.ahead_after == AHEAD_AFTER >= 100
    for tid in "abc":  # asks cost far more than 1 % of these instant trials, but they are too few
        s.suggest(tid)
        s.on_trial_complete(tid, DONE)
    assert s._ahead is None and s.asked_ahead == 0

    def slow_space(trial):
        time.sleep(0.05)
        trial.suggest_float("x", 0.0, 1.0)

    def fast_space(trial):
        trial.suggest_float("x", 0.0, 1.0)

    for space, trial_s, expect in ((slow_space, 0.0, True), (fast_space, 0.5, False)):
        s = _searcher(optuna.storages.InMemoryStorage(), "auto", space=space)
        s.ahead_after = 1
        s.suggest("a")
        assert s._ahead is None  # nothing has ended: the trials' duration is unknown
        time.sleep(trial_s)
        s.on_trial_complete("a", DONE)
        s.suggest("b")
        assert (s._ahead is not None) == expect
        s.close_unfinished("done")


def test_an_ask_ahead_waits_for_the_hand_over_unless_it_is_taken():
    """An ask ahead starts `settle` seconds late (the driver is still starting the trial just suggested), but a
    `suggest` that needs it at once starts it at once."""
    import time

    from study.searcher import _Ahead

    started = []
    ahead = _Ahead(lambda: started.append(time.monotonic()) or "trial", settle=600)
    time.sleep(0.2)
    assert not started  # still settling
    t0 = time.monotonic()
    assert ahead.take() == "trial" and len(started) == 1 and started[0] - t0 < 30


def test_ask_ahead_mode_is_checked(tmp_path):
    from study.runner import SweepSpec, validate

    spec = SweepSpec(study="s", methods=("resnet",), trials=1, fixed={"data.dataset": "synthetic"},
                     results_dir=tmp_path, tracking_uri=f"sqlite:///{tmp_path}/m.db",
                     storage=f"sqlite:///{tmp_path}/o.db", ask_ahead="always")
    with pytest.raises(ConfigError, match="ask_ahead 'always' is not valid; valid: auto, on, off"):
        validate(spec)
    assert not list(tmp_path.iterdir())

    with pytest.raises(ValueError, match="ask_ahead 'sometimes' is not valid; valid: auto, on, off"):
        _searcher(optuna.storages.InMemoryStorage(), "sometimes")


def test_choices_are_drawn_first_and_the_space_sees_them():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize", "minimize"])
    space = SweepSpace(["elastic"], {"model.depth": 20}, {"policy.name": ["budgeted", "entropy"]})
    seen = set()
    for _ in range(12):
        trial = study.ask()
        constants = space(trial)
        searched = config_keys(trial.params)
        name = searched["policy.name"]
        seen.add(name)
        cfg = TrialConfig.from_flat({"model.depth": 20, **constants})
        # the shared policy sub-space searched the drawn policy's own parameter, not the confidence threshold
        assert ("policy.q" in searched) == (name == "budgeted")
        assert ("policy.entropy" in searched) == (name == "entropy")
        assert "policy.threshold" not in searched and cfg.policy.name == name
    assert seen == {"budgeted", "entropy"}


def test_methods_whose_spaces_share_keys_with_other_choices_share_a_study():
    """Optuna keeps one distribution per parameter name for a whole study; resnet's and vgg's model.depth differ
    (as do elastic's and msdnet's model.weights), so parameters are named per method."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize", "minimize"])
    for methods in (["resnet"], ["vgg"], ["elastic", "msdnet"], ["sdn", "vgg"], ["msdnet"]):
        for _ in range(3):
            trial = study.ask()
            cfg = TrialConfig.from_flat(SweepSpace(methods, {})(trial))
            assert cfg.method in methods
            study.tell(trial, [0.5, 1.0])


def test_choices_carry_their_values_in_optuna_names_and_sweeps_with_other_values_share_a_study():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize", "minimize"])
    for choices in ({}, {"model.backbone": ["cifar_resnet", "mobilenet_v2"]}, {"model.backbone": ["resnet18"]},
                    {"optim.lr": [0.05, 0.1]}):
        for _ in range(3):
            trial = study.ask()
            config = SweepSpace(["elastic"], {}, choices)(trial)
            cfg = TrialConfig.from_flat(config)
            for key, values in choices.items():
                assert param_name("elastic", key, values) in trial.params
                assert getattr(cfg.model if key.startswith("model.") else cfg.optim, key.split(".")[1]) in values
            study.tell(trial, [0.5, 1.0])


def test_a_choice_the_space_completes_is_valid_and_wins_over_the_space_constants(tmp_path):
    from study.runner import SweepSpec, validate

    spec = SweepSpec(study="s", methods=("sdn",), trials=1, fixed={"method": "sdn", "data.dataset": "synthetic"},
                     results_dir=tmp_path, tracking_uri=f"sqlite:///{tmp_path}/m.db",
                     storage=f"sqlite:///{tmp_path}/o.db", choices={"model.backbone": ("resnet", "vgg")})
    plan = validate(spec)  # vgg needs depth 16, which sdn's space sets for it
    assert {(c.model.backbone, c.model.depth if c.model.backbone == "vgg" else 0) for c in plan.probes} >= \
        {("vgg", 16), ("resnet", 0)}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize", "minimize"])
    seen = set()
    for _ in range(8):  # a chosen depth is the trained depth, even where the space has a constant for it (vgg: 16)
        seen.add(SweepSpace(["sdn"], {"model.backbone": "vgg"}, {"model.depth": [11, 16]})(study.ask())["model.depth"])
    assert seen == {11, 16}


def test_keys_qualified_with_a_method_apply_to_that_method_only(tmp_path):
    """elastic's and sdn's model.backbone take different values: `elastic:model.backbone` sets elastic's alone."""
    from study.runner import SweepSpec, validate

    fixed = {"data.dataset": "synthetic", "sdn:model.backbone": "resnet", "sdn:model.depth": 20,
             "elastic:model.width": 0.25}
    spec = SweepSpec(study="s", methods=("sdn", "elastic"), trials=1, fixed=fixed, results_dir=tmp_path,
                     tracking_uri=f"sqlite:///{tmp_path}/m.db", storage=f"sqlite:///{tmp_path}/o.db",
                     choices={"elastic:model.backbone": ("mobilenet_v2", "densenet121")})
    probes = validate(spec).probes
    assert {c.method for c in probes} == {"sdn", "elastic"}
    for c in probes:
        if c.method == "elastic":
            assert c.model.backbone in ("mobilenet_v2", "densenet121") and c.model.width == 0.25
        else:
            assert c.model.backbone == "resnet" and c.model.depth == 20
    with pytest.raises(ConfigError, match="'msdnet:model.blocks' is for method 'msdnet', which is not among"):
        validate(dataclasses.replace(spec, fixed={**fixed, "msdnet:model.blocks": 3}))
