"""Settings (pydantic-settings) and the CLI generated from them: the same flags, environment
variables, defaults and "none" semantics as the hand-written parser they replaced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.__main__ import build_parser, flag_name
from coordinator.settings import Settings, env_name, settings_from_env

ROOT = Path(__file__).resolve().parents[1]

# The hand-written FLAGS list of coordinator/__main__.py before flags were generated from the fields.
FLAGS_ON_MAIN = [
    "host", "port", "db", "model", "model_seed", "eval_data", "goal", "over_select", "deadline", "min_fraction",
    "epochs", "batch_size", "lr", "momentum", "strategy", "server_lr", "server_momentum", "beta1", "beta2", "tau",
    "fedprox_mu", "encoding", "topk_fraction", "clip_norm", "noise_multiplier", "max_update_norm",
    "max_sample_count", "trim_beta", "krum_f", "krum_m", "norm_bound", "dp_noise_multiplier", "dp_clip_norm",
    "dp_adaptive_clip", "dp_target_quantile", "dp_clip_lr", "dp_count_stddev", "dp_delta", "dp_population",
    "dp_epsilon_budget", "dp_on_budget", "max_body_bytes", "max_concurrent_uploads", "enrollment_key",
    "admin_token", "tick_interval", "min_retry_after", "max_retry_after", "log_level",
]  # fmt: skip
# Their defaults then (Settings.model_fields on main).
DEFAULTS_ON_MAIN = {
    "goal": 10, "over_select": 1.3, "deadline": 600.0, "min_fraction": 0.8, "epochs": 1, "batch_size": 32,
    "lr": 0.05, "momentum": 0.0, "strategy": "fedavg", "server_lr": 1.0, "server_momentum": 0.9, "beta1": 0.9,
    "beta2": 0.99, "tau": 0.001, "fedprox_mu": 0.01, "encoding": "float32", "topk_fraction": None,
    "clip_norm": None, "noise_multiplier": 0.0, "max_update_norm": 10000.0, "max_sample_count": 1000000,
    "trim_beta": 0.2, "krum_f": 2, "krum_m": 5, "norm_bound": None, "dp_noise_multiplier": 0.0,
    "dp_clip_norm": 0.1, "dp_adaptive_clip": False, "dp_target_quantile": 0.5, "dp_clip_lr": 0.2,
    "dp_count_stddev": None, "dp_delta": 1e-05, "dp_population": None, "dp_epsilon_budget": None,
    "dp_on_budget": "stop", "host": "127.0.0.1", "port": 8000, "db": "pocketfed.db", "model": "lenet",
    "model_seed": 0, "eval_data": None, "max_body_bytes": 67108864, "max_concurrent_uploads": 16,
    "enrollment_key": None, "admin_token": None, "tick_interval": 1.0, "min_retry_after": 5.0,
    "max_retry_after": 600.0, "log_level": "info",
}  # fmt: skip
# Added since, with their defaults.
ADDED = {
    "lease_seconds": 10.0, "db_pool_size": 4,  # issue 14: replicas on PostgreSQL
    "release_tolerance": 0.02, "canary_fraction": 0.0, "max_populations": 16,  # issue 17
    # issue 12: hostile devices and strangers
    "max_json_body_bytes": 65536, "body_grace_seconds": 10.0, "min_body_rate": 4096.0, "max_header_bytes": 16384,
    "header_timeout": 10.0, "max_update_header_bytes": 1048576, "ssl_certfile": None, "ssl_keyfile": None,
    "insecure_dev": False, "device_token_idle_days": 90.0,
    "influence_bound": True, "influence_norm_multiple": 3.0, "influence_count_multiple": 3.0,
    "influence_model_fraction": 0.2, "min_devices": 3, "enroll_per_address": 60, "enroll_failures_per_address": 10,
    "enroll_failures_total": 100,
    "dp_sampling": "poisson", "secure_aggregation": False, "secagg_dropout_tolerance": 1 / 3,  # issue 13
    "secagg_phase_timeout": 60.0,
    "personalize_tasks": True, "personal_epochs": 5, "metrics_task_seconds": 600.0,  # issue 17: personalization
    "feddyn_alpha": 0.01, "participation": 0.1,  # issue 15: FedDyn on real agents
}  # fmt: skip
FLAGS_ON_MAIN += list(ADDED)
DEFAULTS_ON_MAIN = {**DEFAULTS_ON_MAIN, **ADDED}


def generated_flags() -> dict[str, str]:
    """--flag -> dest, as argparse holds them."""
    return {
        option: action.dest
        for action in build_parser()._actions
        for option in action.option_strings
        if option not in ("-h", "--help")
    }


def test_the_flags_are_the_ones_on_main_and_one_per_field():
    flags = generated_flags()
    assert sorted(flags) == sorted(flag_name(name) for name in FLAGS_ON_MAIN)
    assert sorted(flags.values()) == sorted(Settings.model_fields)  # every field has its flag, named after it
    assert flags["--enrollment-key"] == "enrollment_key" and flags["--dp-on-budget"] == "dp_on_budget"


def test_defaults_are_the_ones_on_main():
    assert {name: field.default for name, field in Settings.model_fields.items()} == DEFAULTS_ON_MAIN
    assert settings_from_env({}).model_dump() == {**DEFAULTS_ON_MAIN}


SPECIAL = {  # (an environment value, a flag value) for fields whose range the generic samples miss
    "strategy": ("fedadam", "median"),
    "encoding": ("int8", "float16"),
    "dp_on_budget": ("warn", "stop"),
    "dp_adaptive_clip": ("true", "false"),
    "max_body_bytes": ("2048", "4096"),
    "over_select": ("1.5", "2.5"),
    "lease_seconds": ("5", "20"),
    "max_json_body_bytes": ("2048", "4096"),
    "max_header_bytes": ("2048", "4096"),
    "max_update_header_bytes": ("8192", "16384"),
    "insecure_dev": ("true", "false"),
    "influence_bound": ("false", "true"),
    "min_devices": ("2", "1"),
    "influence_norm_multiple": ("2", "4"),
    "influence_count_multiple": ("2", "4"),
    "influence_model_fraction": ("0.5", "0.25"),
    "dp_sampling": ("unamplified", "poisson"),
    "secure_aggregation": ("true", "false"),
    "personalize_tasks": ("false", "true"),
}


def sample_values(name: str) -> tuple[str, str]:
    if name in SPECIAL:
        return SPECIAL[name]
    annotation = Settings.model_fields[name].annotation
    if annotation in (int, int | None):
        return "3", "4"
    if annotation in (float, float | None):
        return "0.25", "0.125"
    return "a", "b"


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_field_reads_its_environment_variable_and_its_flag(name):
    """PF_<FIELD> and --<field> both reach the field, validated alike; the flag wins over the variable."""
    env_value, flag_value = sample_values(name)
    from_env = getattr(settings_from_env({env_name(name): env_value}), name)
    assert from_env == getattr(settings_from_env({}, **{name: env_value}), name)
    assert from_env != Settings.model_fields[name].default
    args = build_parser().parse_args([flag_name(name), flag_value])
    both = getattr(settings_from_env({env_name(name): env_value}, **vars(args)), name)
    assert both == getattr(settings_from_env({}, **{name: flag_value}), name) != from_env


def test_none_clears_an_optional_setting_from_the_environment_and_the_command_line():
    assert settings_from_env({"PF_CLIP_NORM": "0.5"}).clip_norm == 0.5
    for word in ("none", "None", "NULL", ""):
        assert settings_from_env({"PF_CLIP_NORM": "0.5", "PF_NORM_BOUND": word}).norm_bound is None
    args = build_parser().parse_args(["--clip-norm", "none", "--eval-data", "null"])
    cleared = settings_from_env({"PF_CLIP_NORM": "0.5", "PF_EVAL_DATA": "/data"}, **vars(args))
    assert (cleared.clip_norm, cleared.eval_data) == (None, None)
    with pytest.raises(ValueError, match="goal"):  # a required setting cannot be cleared
        settings_from_env({"PF_GOAL": "none"})


def test_bad_values_name_the_setting():
    for env, field in (({"PF_PORT": "99999"}, "port"), ({"PF_ENCODING": "bfloat16"}, "encoding")):
        with pytest.raises(ValueError, match=field):
            settings_from_env(env)


def test_help_lists_every_flag_with_its_environment_variable():
    run = subprocess.run(
        [sys.executable, "-m", "coordinator", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())
    for name in FLAGS_ON_MAIN:
        assert flag_name(name) in text and env_name(name) in text, name
