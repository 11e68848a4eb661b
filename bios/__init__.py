"""Bios: an open LoRA fine-tuning service API.

    import bios
    service = bios.ServiceClient()
    training = service.create_lora_training_client(base_model="bios/tiny", rank=8)

`bios` never imports a backend at import time; backends are found by entry point when a
`ServiceClient` starts.
"""

from bios import types
from bios.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BackendError,
    BiosError,
    BlockingCallError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    SessionExpiredError,
    UnsupportedError,
)
from bios.futures import BiosFuture
from bios.rest_client import RestClient
from bios.sampling_client import SamplingClient
from bios.service_client import ServiceClient
from bios.simulation import SimulationConfig
from bios.tokenizer import Tokenizer
from bios.training_client import TrainingClient

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AuthenticationError",
    "BackendError",
    "BiosError",
    "BiosFuture",
    "BlockingCallError",
    "ConflictError",
    "InvalidRequestError",
    "NotFoundError",
    "RateLimitError",
    "RequestTooLargeError",
    "RestClient",
    "SamplingClient",
    "ServiceClient",
    "ServiceUnavailableError",
    "SessionExpiredError",
    "SimulationConfig",
    "Tokenizer",
    "TrainingClient",
    "UnsupportedError",
    "types",
]
