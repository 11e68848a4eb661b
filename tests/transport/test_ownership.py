"""Who owns what: an `EnginePool` owns its engines (shared by the clients of one pool with the
same settings) and shuts them down; a ServiceClient owns its custom-loss workers and, remote,
its HTTP transport, and `close()` / `with` releases them."""

from __future__ import annotations

import gc
import threading

import pytest
from helpers import MODEL, random_batch
from server_process import ThreadedServer

import bios
from bios.server import ServerOptions
from bios.transport.inprocess import EnginePool, default_pool


def _sum_of_logprobs(data, logprobs):
    return sum(-lp.sum() for lp in logprobs), {}


@pytest.mark.inprocess
def test_clients_of_one_pool_share_its_engine_and_closing_the_pool_stops_it() -> None:
    pool = EnginePool()
    first = bios.ServiceClient(backend="emulator", engines=pool)
    second = bios.ServiceClient(backend="emulator", engines=pool)
    assert first.transport is second.transport
    assert first.transport is not bios.ServiceClient(backend="emulator").transport
    settings = first.config.home, first.config.backend_options
    assert bios.ServiceClient(backend="emulator").transport is default_pool().engine("emulator", *settings)
    training = first.create_lora_training_client(MODEL, rank=4, seed=0)
    assert training.forward(random_batch(seed=1)).result().loss > 0
    pool.close()
    with pytest.raises(bios.BiosError):
        training.forward(random_batch(seed=1)).result()
    with pytest.raises(bios.BiosError):
        bios.ServiceClient(backend="emulator", engines=pool)


@pytest.mark.inprocess
def test_closing_a_service_client_stops_its_custom_losses_but_not_the_shared_engine() -> None:
    with bios.ServiceClient(backend="emulator") as service:
        training = service.create_lora_training_client(MODEL, rank=4, seed=0)
        batch = random_batch(seed=2)
        assert training.forward_backward_custom(batch, _sum_of_logprobs).result().loss > 0
    with pytest.raises(bios.BiosError) as err:
        training.forward_backward_custom(batch, _sum_of_logprobs).result()
    assert "closed" in err.value.message
    assert training.forward_backward(batch).result().loss > 0  # the engine belongs to the pool
    assert training.forward(batch).result().loss > 0  # and the released sequence number let it run


def _loop_threads(url: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == f"bios-http {url}"]


def test_a_remote_client_closes_its_transport_on_close_and_when_dropped(tmp_path) -> None:
    options = ServerOptions(backend="emulator", no_auth=True, home=tmp_path)
    with ThreadedServer(options) as server:
        with bios.ServiceClient(base_url=server.url) as service:
            training = service.create_lora_training_client(MODEL, rank=4, seed=0)
            assert training.forward(random_batch(seed=3)).result().loss > 0
            assert len(_loop_threads(server.url)) == 1
        assert _loop_threads(server.url) == []
        with pytest.raises(bios.BiosError) as err:
            training.get_info()
        assert "closed" in err.value.message

        dropped = bios.ServiceClient(base_url=server.url)
        dropped.create_lora_training_client(MODEL, rank=4, seed=0).forward(random_batch(seed=4)).result()
        (thread,) = _loop_threads(server.url)
        del dropped
        gc.collect()
        thread.join(timeout=30)
        assert not thread.is_alive()
