"""Source of the transformers remote code written by ``hs-scale export-hf --all-tasks`` (copied verbatim into the
exported directory; it imports only torch and transformers, never hs_scale)."""
