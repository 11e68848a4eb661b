"""The typed vocabulary of the Bios API (`from bios import types`)."""

from bios.types.params import AdamParams, LoraConfig, SamplingParams
from bios.types.results import (
    CheckpointKind,
    CheckpointList,
    ExternalWeightsUrls,
    ForwardBackwardOutput,
    ForwardBackwardResult,
    ModelInfo,
    OptimStepResult,
    RequestTiming,
    SampledSequence,
    SampleResponse,
    SampleResult,
    ServerCapabilities,
    StateResult,
    StopReason,
    TrainingInfo,
    TrainingResult,
    TrainingRunList,
    WeightsInfo,
)
from bios.types.tensors import Datum, EncodedTextChunk, ModelInput, TensorData, TensorDtype

ModelOutput = ForwardBackwardResult

__all__ = [
    "AdamParams",
    "CheckpointKind",
    "CheckpointList",
    "Datum",
    "EncodedTextChunk",
    "ExternalWeightsUrls",
    "ForwardBackwardOutput",
    "ForwardBackwardResult",
    "LoraConfig",
    "ModelInfo",
    "ModelInput",
    "ModelOutput",
    "OptimStepResult",
    "RequestTiming",
    "SampleResponse",
    "SampleResult",
    "SampledSequence",
    "SamplingParams",
    "ServerCapabilities",
    "StateResult",
    "StopReason",
    "TensorData",
    "TensorDtype",
    "TrainingInfo",
    "TrainingResult",
    "TrainingRunList",
    "WeightsInfo",
]
