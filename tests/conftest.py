"""Test setup: 8 simulated CPU devices and one persistent compilation cache, set before jax is imported anywhere."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the whole run, shared by the xdist workers and every subprocess a test starts (they
# inherit the environment): the launch, fault-tolerance and multi-process tests start many processes that compile
# the same tiny programs, and compiling is most of what they cost. The first process of a run makes the folder and
# removes it at the end; a cache folder the caller names is used as is and kept.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lumen-test-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_cfg():
    """A tiny GQA model config shared across tests (vocab of the arithmetic tokenizer)."""
    from framework.models import lm

    return lm.LMConfig(
        vocab_size=24, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=128
    )


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
