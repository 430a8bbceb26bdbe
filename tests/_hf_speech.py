"""HF Speech2Text run on each utterance of a padded batch alone (import with `from _hf_speech import ...`).

hs_scale's subsampler is padding-invariant (hs_scale.models.s2t.Conv1dSubsampler): an utterance's outputs in a
batch are what it gives alone. HF's is not (it convolves the batch's padding into an utterance's last frames), so
parity tests compare our batched outputs with HF's per utterance, unpadded.

Legend: B batch, T frames, F features, S encoder positions, L target length, V vocabulary.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def hf_logits_alone(hf, features_BTF: torch.Tensor, lengths_B: torch.Tensor | None,
                    decoder_input_BL: torch.Tensor) -> torch.Tensor:
    """logits_BLV: row i is HF's logits for features_BTF[i, :lengths_B[i]] alone and decoder_input_BL[i]."""
    rows = []
    for i in range(features_BTF.shape[0]):
        n = features_BTF.shape[1] if lengths_B is None else int(lengths_B[i])
        out = hf(input_features=features_BTF[i : i + 1, :n], decoder_input_ids=decoder_input_BL[i : i + 1])
        rows.append(out.logits)
    return torch.cat(rows)


@torch.no_grad()
def hf_memory_alone(hf, features_BTF: torch.Tensor, lengths_B: torch.Tensor) -> list[torch.Tensor]:
    """[memory_SD per row]: HF's encoder output for each utterance alone (its S valid positions)."""
    return [hf.model.encoder(input_features=features_BTF[i : i + 1, : int(n)]).last_hidden_state[0]
            for i, n in enumerate(lengths_B.tolist())]
