"""The model registry: versions, cards, the current pointer and the upload records in the bucket."""

from bucketml.registry.model_registry import (
    InvalidModelName,
    Pointer,
    Registry,
    RegistryError,
    UploadRegistered,
    check_model_name,
    check_version,
)

__all__ = ["InvalidModelName", "Pointer", "Registry", "RegistryError", "UploadRegistered", "check_model_name", "check_version"]
