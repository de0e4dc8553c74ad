"""The streaming Perceiver IO: many modalities in; flow, labels and an embedding out; latents carried.

    batch --(MultimodalPreprocessor: adapters, one slice of channels per modality)--> tokens B x N x D
          --(PerceiverEncoder: cross-attention from M latents, a modality's gate as a logit bias;
             a modality's own latents see its tokens alone)--> read  B x M x C
          --(the encoder's self-attention tower)--> z  B x M x C
          --> flow:      FrameFlowDecoder(z)                     B x H x W x 2 px
          --> labels:    LabelDecoder(read, pooled token reads)   B x K logits
          --> embedding: mean over latents of LayerNorm(z)        B x C (compare with cosine)

Streaming state: ``z`` of window t seeds window t+1 of the same stream,
``latents0 = learned + sigmoid(state_gate) * Linear(LayerNorm(z_prev))``, except where
``batch.reset`` is True, no state is given or ``config.state.carry`` is False.

Modality gating: each modality has a learned gate per encoder head, added to the cross-attention
logits of its tokens as ``logsigmoid(gate)`` (it scales that modality's share of attention). A
modality absent from a row is masked out of the keys, so it leaves no trace (its own latents, with
no key to attend to, get a zero attention output); ``multimodal.drop_modalities`` trains the model
to cope with any non-empty subset.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_stream.adapters import build_adapter
from perceiver_stream.batch import Batch
from perceiver_stream.config import StreamingConfig
from perceiver_stream.multimodal import MultimodalPreprocessor
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.perceiver import EncoderConfig, PerceiverEncoder, Tokens
from perceiver_stream.stream_decoders import FrameFlowDecoder, LabelDecoder


class StreamingPerceiverIO(nn.Module):
    """The fused multimodal streaming model (see the module docstring), built from a `StreamingConfig`.

    Modules: ``preprocess`` (adapters to tokens), ``encoder`` (latents, cross-attention, tower),
    ``modality_gate`` (``modalities x cross_heads``), ``state_norm`` / ``state_proj`` /
    ``state_gate`` (the carried state), ``final_norm`` (the embedding), ``labels`` and ``flow``
    (the decoders; None where the config has none).
    """

    def __init__(self, config: StreamingConfig) -> None:
        super().__init__()
        self.config = config
        enc = config.encoder
        c = enc.latent_channels
        self.preprocess = MultimodalPreprocessor(
            {k: build_adapter(spec) for k, spec in config.modalities.items()},
            min_padding=enc.min_padding,
            pool=config.labels.pool,
        )
        names = self.preprocess.names
        self.encoder = PerceiverEncoder(EncoderConfig(
            input_channels=self.preprocess.width,
            num_latents=config.total_latents,
            d_latents=c,
            num_blocks=enc.num_blocks,
            num_self_attends_per_block=enc.self_attends_per_block,
            num_self_attention_heads=enc.self_heads,
            num_cross_attention_heads=enc.cross_heads,
            cross_attention_shape_for_attention="q",
            self_attention_widening_factor=enc.self_widening,
            cross_attention_widening_factor=enc.cross_widening,
        ))
        self.modality_gate = nn.Parameter(torch.zeros(len(names), enc.cross_heads))
        own = [-1] * enc.num_latents + [names.index(k) for k in names for _ in range(enc.modality_latents.get(k, 0))]
        # Which modality each latent may attend to in the encoder (-1: any); derived from the config.
        self.register_buffer("latent_modality", torch.tensor(own, dtype=torch.long), persistent=False)
        self.state_norm = nn.LayerNorm(c)
        self.state_proj = nn.Linear(c, c)
        self.state_gate = nn.Parameter(torch.full((c,), float(config.state.gate_init)))
        self.final_norm = nn.LayerNorm(c)
        # The latent groups (the shared latents, then each modality's own) and the modality of each.
        self.group_modality: list[str | None] = [None] + [k for k in names if enc.modality_latents.get(k, 0)]
        ends = [enc.num_latents]
        for k in self.group_modality[1:]:
            ends.append(ends[-1] + enc.modality_latents[k])
        self.labels = LabelDecoder(
            c, config.num_classes, heads=config.labels.heads, groups=list(zip([0, *ends[:-1]], ends)),
            pool={k: self.preprocess.adapters[k].pool_channels[1] - self.preprocess.adapters[k].pool_channels[0]
                  for k in config.labels.pool},
            from_flow=config.labels.from_flow,
        ) if config.num_classes else None
        self.flow = FrameFlowDecoder(config.flow, c) if config.flow is not None else None

    # -- pieces -------------------------------------------------------------------------------

    def initial_latents(self, state: torch.Tensor | None, reset: torch.Tensor) -> torch.Tensor | None:
        """Seed latents ``B x M x C`` from the previous window's state, or None for the learned ones.

        Rows with ``reset`` True start from the learned latents alone.
        """
        if state is None or not self.config.state.carry or bool(reset.all()):
            return None
        carry = (~reset).to(state.device)[:, None, None]
        seed = torch.sigmoid(self.state_gate) * self.state_proj(self.state_norm(state))
        return self.encoder.latents[None] + torch.where(carry, seed, 0.0)

    def _read(self, tok: Tokens, reset: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """The encoder's cross-attention output ``B x M x C`` (the latents after reading the tokens)."""
        source = self.preprocess.token_modality(tok)  # N
        mask = tok.mask
        if self.config.encoder.modality_latents:
            own = self.latent_modality
            mask = mask[:, None, :] & ((own[:, None] < 0) | (own[:, None] == source[None, :]))[None]
        bias = F.logsigmoid(self.modality_gate)[source].transpose(0, 1)  # H x N
        return self.encoder.attend_inputs(tok.tokens, mask, self.initial_latents(state, reset), key_bias=bias)

    def encode(self, batch: Batch, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's cross-attention output (what the labels read) and the tower's output ``z``,
        the latents that end each window (both ``B x M x C``)."""
        read = self._read(self.preprocess(batch), batch.reset, state)
        return read, self.encoder.refine(read)

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """The window embedding ``B x C``: mean over latents of ``LayerNorm(z)`` (not L2-normalised)."""
        return self.final_norm(z).mean(dim=1)

    def pool_parameters(self) -> list[nn.Parameter]:
        """The parameters of the pooled label reads (their projections and gates, and the adapters'
        layers that make the pooled channels): what the pool phase of training trains, and only that."""
        params = [p for k in self.config.labels.pool for p in self.preprocess.adapters[k].pool_parameters()]
        if self.labels is not None and self.labels.pools:
            params += [*self.labels.pools.parameters(), self.labels.pool_gates]
        return params

    # -- the model ----------------------------------------------------------------------------

    def forward(self, batch: Batch, state: torch.Tensor | None = None) -> ModelOutput:
        """Outputs for ``batch``; ``state`` (``B x M x C``, from the previous window of each row's
        stream, e.g. ``StreamStates.gather``) seeds the latents where ``batch.reset`` is False."""
        tok = self.preprocess(batch)
        read = self._read(tok, batch.reset, state)
        z = self.encoder.refine(read)
        if self.flow is None:
            flow, flow_valid = None, torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        else:
            flow, flow_valid = self.flow(batch.modalities.get(self.config.flow.modality), z)
        group_logits = group_valid = None
        if self.labels is None:
            logits = z.new_zeros(z.shape[0], 0)
        else:
            logits, group_logits = self.labels(read, tok, None if flow is None else (flow, flow_valid))
            group_logits = group_logits.float()
            group_valid = torch.stack([self._present(batch, k) for k in self.group_modality], dim=1)
        return ModelOutput(
            embedding=self.embed(z).float(),
            label_logits=logits.float(),
            flow=None if flow is None else flow.float(),
            flow_valid=flow_valid,
            state=z,
            group_logits=group_logits,
            group_valid=group_valid,
        )

    def latent_label_read(self, batch: Batch, state: torch.Tensor | None = None) -> torch.Tensor:
        """The latent groups' summed label read ``B x C`` (no tower, no flow). ``labels.head`` of it
        plus `pooled_label_read` gives ``forward(batch, state).label_logits`` (without ``labels.from_flow``)."""
        return self.labels.group_reads(self._read(self.preprocess(batch), batch.reset, state)).sum(dim=1)

    def pooled_label_read(self, batch: Batch) -> torch.Tensor:
        """The pooled reads' sum ``B x C`` (from the pooled modalities' adapters alone)."""
        pooled = {k: m for k, m in batch.modalities.items() if k in self.config.labels.pool}
        return self.labels.pooled_reads(self.preprocess(replace(batch, modalities=pooled))).sum(dim=1)

    def _present(self, batch: Batch, modality: str | None) -> torch.Tensor:
        """``B`` bool: rows where ``modality`` is present (every row for None, the shared latents)."""
        b, device = len(batch), self.latent_modality.device
        if modality is None:
            return torch.ones(b, dtype=torch.bool, device=device)
        m = batch.modalities.get(modality)
        return torch.zeros(b, dtype=torch.bool, device=device) if m is None else m.present.to(device)

    def modality_gates(self) -> dict[str, torch.Tensor]:
        """Each modality's encoder gate, ``sigmoid(gate)`` per head (1 = full share of attention)."""
        g = torch.sigmoid(self.modality_gate.detach())
        return {name: g[i] for i, name in enumerate(self.preprocess.names)}


class StreamStates:
    """The latent state of each stream between windows (for the model actor and training).

    ``gather(batch)`` returns the batch with ``reset`` also set where no state for the previous
    window id of that stream is held, and the ``B x M x C`` state to pass to the model (None when
    every row resets); ``update(batch, output.state)`` stores each row's new state (detached).
    A window can only use the state of the window before it, so a stream that appears twice in a
    batch raises ValueError, or with ``strict=False`` all its windows there start afresh.
    """

    def __init__(self) -> None:
        self._states: dict[str, tuple[int, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._states)

    def gather(self, batch: Batch, *, strict: bool = True) -> tuple[Batch, torch.Tensor | None]:
        """``(batch with reset where no usable state, state or None)``."""
        repeated = {sid for sid in batch.stream_ids if batch.stream_ids.count(sid) > 1}
        if repeated and strict:
            raise ValueError(f"streams {sorted(repeated)} appear more than once in the batch; "
                             "a window needs the state its predecessor leaves, so batch one window per stream")
        found = []
        for sid, wid, reset in zip(batch.stream_ids, batch.window_ids.tolist(), batch.reset.tolist()):
            held = self._states.get(sid)
            usable = held is not None and held[0] == wid - 1 and not reset and sid not in repeated
            found.append(held[1] if usable else None)
        reset = torch.tensor([s is None for s in found], dtype=torch.bool, device=batch.reset.device)
        batch = replace(batch, reset=reset)
        if all(s is None for s in found):
            return batch, None
        like = next(s for s in found if s is not None)
        return batch, torch.stack([like.new_zeros(like.shape) if s is None else s for s in found])

    def update(self, batch: Batch, state: torch.Tensor) -> None:
        """Remember ``state[i]`` as the state after window ``batch.window_ids[i]`` of its stream."""
        for i, (sid, wid) in enumerate(zip(batch.stream_ids, batch.window_ids.tolist())):
            self._states[sid] = (wid, state[i].detach())

    def forget(self, stream_id: str) -> None:
        """Drop a finished stream's state."""
        self._states.pop(stream_id, None)
