"""Shared test set-up.

Random inputs are fresh on every run; the base seed is printed in the report header
and can be replayed with MLA_TEST_SEED=<seed>.
"""

import os
import random
import tempfile
import zlib

import pytest
import torch

BASE_SEED = int(os.environ.get("MLA_TEST_SEED") or random.SystemRandom().randrange(2**31))

# vLLM settings for every engine started by the tests (set before vLLM is imported).
_VLLM_TMP = tempfile.mkdtemp(prefix="mla_plugin_tests_")
os.environ["VLLM_CACHE_ROOT"] = os.path.join(_VLLM_TMP, "vllm_cache")  # compile cache does not reload here
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes most of RAM
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in Triton's interpreter, which must be on before
# triton is first imported (by vLLM or by us); kernel selection still defaults to torch
# on CPU, so this changes nothing for tests that do not ask for MLA_PLUGIN_KERNEL=triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    return f"MLA_TEST_SEED={BASE_SEED} (set it to replay these random inputs)"


def seed_for(nodeid: str) -> int:
    return (BASE_SEED + zlib.crc32(nodeid.encode())) % 2**31


@pytest.fixture
def rng(request) -> torch.Generator:
    """A torch generator seeded per test from the run's base seed."""
    return torch.Generator().manual_seed(seed_for(request.node.nodeid))
