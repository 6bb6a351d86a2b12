import random

import pytest
import torch

import ssm_kernels
from ssm_kernels import testing


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", testing.devices())


@pytest.fixture(autouse=True)
def _seed_and_poison():
    random.seed(0)
    torch.manual_seed(0)
    with testing.poisoned_outputs():
        yield


def pytest_report_header(config):
    info = ssm_kernels.build_info()
    return f"ssm_kernels build: {info}; torch threads: {torch.get_num_threads()}"
