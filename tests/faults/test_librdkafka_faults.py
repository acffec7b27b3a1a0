"""The delivery and fault tests again with librdkafka as the worker's Kafka client (``kafka.client``).

Same streams, same faults, same accounting as ``test_faults``: nothing missing in any of them, no
duplicates after a SIGTERM, the poison dead-lettered with its reasons. The rows land in the fault
table under these tests' names.
"""

from __future__ import annotations

import pytest

from . import test_faults as same

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def rd_lane(fault_lane):
    settings, workdir = fault_lane
    kafka = settings.kafka.model_copy(update={"client": "librdkafka"})
    return settings.model_copy(update={"kafka": kafka}), workdir


def test_librdkafka_sigkill_worker_mid_stream_then_restart(rd_lane, report):
    same.test_sigkill_worker_mid_stream_then_restart(rd_lane, report)


def test_librdkafka_sigterm_worker_mid_stream_leaves_no_duplicates(rd_lane, report):
    same.test_sigterm_worker_mid_stream_leaves_no_duplicates(rd_lane, report)


def test_librdkafka_triton_killed_mid_stream_and_restarted_after_10s(rd_lane, fault_stack, report):
    same.test_triton_killed_mid_stream_and_restarted_after_10s(rd_lane, fault_stack, report)


def test_librdkafka_group_of_three_grows_to_four_then_loses_one(rd_lane, report):
    same.test_group_of_three_grows_to_four_then_loses_one(rd_lane, report)


def test_librdkafka_five_percent_poison_of_every_class(rd_lane, report):
    same.test_five_percent_poison_of_every_class(rd_lane, report)


def test_librdkafka_exactly_once_worker_killed_mid_transaction(rd_lane, fault_stack, report):
    same.test_exactly_once_worker_killed_mid_transaction(rd_lane, fault_stack, report)
