"""Sampling clients' targets: frozen snapshot adapters of saved checkpoints, or bare base models.

`Samplers` files each sampling client under its id and queues its requests unordered (a
snapshot never changes, so they need no order), sharing snapshot adapters through the
`SnapshotPool`.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import Future

from bios import validation
from bios.catalog import Catalog
from bios.engine import results
from bios.engine.checkpoints import CheckpointStore
from bios.engine.scheduler import Batched, Job, Scheduler
from bios.engine.snapshots import SnapshotPool
from bios.errors import BackendError, InvalidRequestError, NotFoundError
from bios.handles import SamplerHandle
from bios.types import Datum, ModelInput, SampleResult, SamplingParams


class Samplers:
    """The live sampling clients of an engine, by id."""

    def __init__(self, catalog: Catalog, store: CheckpointStore, snapshots: SnapshotPool, scheduler: Scheduler) -> None:
        self.catalog = catalog
        self.store = store
        self.snapshots = snapshots
        self.scheduler = scheduler
        self._handles: dict[str, SamplerHandle] = {}
        self._lock = threading.Lock()

    def create(
        self, model_path: str | None = None, base_model: str | None = None, *, sampler_id: str | None = None
    ) -> SamplerHandle:
        """A sampling target for a saved checkpoint (`model_path`) or a bare `base_model`
        (named `sampler_id` when given, e.g. to serve a sampler again after a restart)."""
        if (model_path is None) == (base_model is None):
            raise InvalidRequestError("give exactly one of model_path and base_model", field="model_path")
        sampler_id = sampler_id or f"sampler-{uuid.uuid4().hex[:12]}"
        if model_path is None:
            handle = SamplerHandle(sampler_id, self.catalog.get(str(base_model)).name, None)
        else:
            record = self.store.record(model_path)
            self.catalog.get(record.base_model)
            adapter_id = self.scheduler.call(lambda: self.snapshots.acquire(record)).result()
            handle = SamplerHandle(sampler_id, record.base_model, str(adapter_id), record.id)
        with self._lock:
            self._handles[handle.sampler_id] = handle
        return handle

    def release(self, sampler_id: str) -> None:
        """Forget a sampling client; its snapshot adapter is freed when no other client uses it.
        Does not wait; unknown ids and a shut-down engine are ignored."""
        with self._lock:
            handle = self._handles.pop(sampler_id, None)
        if handle is None or handle.checkpoint_id is None:
            return
        checkpoint_id = handle.checkpoint_id
        try:
            self.scheduler.call(lambda: self.snapshots.release(checkpoint_id))
        except BackendError:
            pass

    def sample(
        self,
        sampler_id: str,
        prompt: ModelInput,
        params: SamplingParams,
        num_samples: int = 1,
        *,
        prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> Future[SampleResult]:
        """Completions from a frozen snapshot or base model."""
        handle = self.handle(sampler_id)
        model = self.catalog.get(handle.base_model)
        work = validation.sample_work(
            handle.adapter_id,
            model,
            prompt,
            params,
            num_samples,
            prompt_logprobs=prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
        )
        job = Job(Batched("sample", handle.base_model, work), results.sample_result, source=sampler_id)
        return self.scheduler.submit(None, None, job)

    def logprobs(self, sampler_id: str, prompt: ModelInput) -> Future[list[float | None]]:
        """log p(prompt[t] | prompt[:t]), None for t = 0."""
        handle = self.handle(sampler_id)
        model = self.catalog.get(handle.base_model)
        prompt = validation.instance(prompt, ModelInput, "prompt")
        ids = validation.check_tokens(prompt.to_ints(), model, "prompt")
        if ids.size == 1:
            done: Future[list[float | None]] = Future()
            done.set_result([None])
            return done
        datum = Datum(model_input=ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]})
        work = validation.forward_work(handle.adapter_id, model, [datum], "cross_entropy", None, backward=False)
        job = Job(Batched("forward_backward", model.name, work), results.prompt_logprobs, source=sampler_id)
        return self.scheduler.submit(None, None, job)

    def handle(self, sampler_id: str) -> SamplerHandle:
        try:
            return self._handles[sampler_id]
        except KeyError:
            raise NotFoundError(f"sampler_id: no sampling client {sampler_id!r}", field="sampler_id") from None
