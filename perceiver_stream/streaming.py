"""The streaming Perceiver IO: many modalities in, flow / labels / embedding out, latents carried.

    batch --(multimodal preprocessor)--> tokens  B x N x D
          --(gated cross-attention from M latents; a modality's own latents see its tokens only)--> B x M x C
          --(latent self-attention tower, weights shared across blocks)--> z
          --> flow:      one query per pixel of the flow grid (3x3 patches of the last two frames +
                         Fourier position), cross-attends to z, in chunks -> B x H x W x 2 px
          --> labels:    one learned query (one per latent group with ``label_groups``, reads
                         summed) -> num_classes logits (reading the encoder's latents instead of z
                         with ``labels_from_encoder``)
          --> embedding: mean over latents of LayerNorm(z)  (not L2-normalised; compare with cosine)

Streaming state: the latents ``z`` that end window t seed window t+1 of the same stream,
``latents0 = learned + sigmoid(state_gate) * Linear(LayerNorm(z_prev))``, except where
``batch.reset`` is True or no state is given. With ``config.state = False`` the state is ignored
and every window is processed on its own.

Modality gating: each modality has a learned gate per encoder head, added to the encoder's
attention logits as ``logsigmoid(gate)`` (it scales that modality's share of attention). A modality
absent from a row is masked out of the keys, so it leaves no trace (its own latents, with no key
to attend to, get a zero attention output); ``drop_modalities`` (in ``perceiver_stream.multimodal``)
trains the model to cope with any non-empty subset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_stream.adapters import FlowInputAdapter, build_adapter, normalise_frames
from perceiver_stream.attention import MLP, CrossAttention, MultiHeadAttention, SelfAttention
from perceiver_stream.batch import Batch
from perceiver_stream.config import StreamingConfig
from perceiver_stream.fourier import fourier_channels, grid_fourier_features
from perceiver_stream.multimodal import MultimodalPreprocessor
from perceiver_stream.perceiver import Tokens
from perceiver_stream.outputs import ModelOutput


class GatedCrossAttention(nn.Module):
    """Perceiver IO encoder cross-attention whose keys carry a learned per-source logit gate.

    Same layer as ``attention.CrossAttention`` (pre-LN on queries and keys, query residual, MLP),
    plus ``gate``: ``num_sources x num_heads``; a key from source ``s`` gets ``logsigmoid(gate[s, h])``
    added to its logit in head ``h``. Masked keys get no weight; a row without keys gets zeros from
    the attention (then the output projection's bias, as in ``attention.masked_attention``).
    """

    def __init__(self, q_dim: int, kv_dim: int, num_sources: int, *, num_heads: int, widening_factor: int) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(q_dim)
        self.kv_norm = nn.LayerNorm(kv_dim)
        self.attn = MultiHeadAttention(
            q_dim, kv_dim, qk_channels=q_dim, v_channels=q_dim, num_heads=num_heads, out_dim=q_dim
        )
        self.mlp_norm = nn.LayerNorm(q_dim)
        self.mlp = MLP(q_dim, widening_factor)
        self.gate = nn.Parameter(torch.zeros(num_sources, num_heads))

    def query_heads(self, queries: torch.Tensor) -> torch.Tensor:
        """Projected queries ``B x H x M x d`` (input-independent for learned latents: cacheable)."""
        q = self.attn.q(self.q_norm(queries))
        b, m, c = q.shape
        h = self.attn.num_heads
        return q.view(b, m, h, c // h).transpose(1, 2)

    def forward(
        self,
        queries: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        source: torch.Tensor,
        q_heads: torch.Tensor | None = None,
        query_source: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``queries`` ``B|1 x M x C``, ``tokens`` ``B x N x D``, ``mask`` ``B x N``, ``source`` ``N``;
        ``query_source`` ``M`` (optional): the one source each query may attend to, -1 for any."""
        b = tokens.shape[0]
        q = self.query_heads(queries) if q_heads is None else q_heads
        q = q.expand(b, -1, -1, -1)
        h, m, d = q.shape[1:]
        if tokens.shape[1] == 0:
            o = q.new_zeros(b, h, m, d)
        else:
            k, v = self.attn.project_kv(self.kv_norm(tokens))
            attend = mask[:, None, :]  # B x 1|M x N
            if query_source is not None:
                own = (query_source[:, None] < 0) | (query_source[:, None] == source[None, :])
                attend = attend & own[None]
            empty = ~attend.any(dim=-1)  # B x 1|M
            attend = attend | empty[..., None]
            bias = F.logsigmoid(self.gate)[source].transpose(0, 1).to(q.dtype)  # H x N
            logits_bias = torch.where(attend[:, None], bias[None, :, None, :], float("-inf"))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=logits_bias)
            o = torch.where(empty[:, None, :, None], 0.0, o)
        x = self.attn.out(o.transpose(1, 2).reshape(b, m, h * d)) + queries
        return x + self.mlp(self.mlp_norm(x))


class _Cache:
    """Results of input-independent projections, reused while their parameters are unchanged.

    Used only when autograd is off (inference): the key holds each parameter's storage and version
    counter, so an optimiser step, ``load_state_dict`` or ``.to()`` invalidates it.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, torch.Tensor]] = {}

    def get(self, name: str, params: Sequence[torch.Tensor], device: torch.device,
            compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled():
            return compute()
        key = (device.type, torch.is_autocast_enabled(device.type), *((p.data_ptr(), p._version) for p in params))
        hit = self._entries.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = compute()
        self._entries[name] = (key, value)
        return value


class StreamingPerceiverIO(nn.Module):
    """The fused multimodal streaming model (see the module docstring); built from a ``StreamingConfig``."""

    def __init__(self, config: StreamingConfig) -> None:
        super().__init__()
        self.config = config
        enc = config.encoder
        c, m = enc.latent_channels, config.total_latents
        self.preprocess = MultimodalPreprocessor(
            {k: build_adapter(spec) for k, spec in config.modalities.items()},
            min_padding=enc.min_padding,
            pool=config.labels.pool,
        )
        self.latents = nn.Parameter(0.02 * torch.randn(m, c))
        names = self.preprocess.names
        own = [-1] * enc.num_latents + [
            names.index(k) for k in names for _ in range(enc.modality_latents.get(k, 0))
        ]
        # Which modality each latent may attend to in the encoder (-1: any); derived from the config.
        self.register_buffer("latent_modality", torch.tensor(own, dtype=torch.long), persistent=False)
        self.encoder = GatedCrossAttention(
            c, self.preprocess.width, len(self.preprocess.names),
            num_heads=enc.cross_heads, widening_factor=enc.cross_widening,
        )
        self.tower = nn.ModuleList(
            SelfAttention(c, num_heads=enc.self_heads, widening_factor=enc.self_widening)
            for _ in range(enc.self_attends_per_block)
        )
        self.state_norm = nn.LayerNorm(c)
        self.state_proj = nn.Linear(c, c)
        self.state_gate = nn.Parameter(torch.full((c,), float(config.state.gate_init)))
        self.final_norm = nn.LayerNorm(c)
        ends = [enc.num_latents]
        for k in names:
            if enc.modality_latents.get(k, 0):
                ends.append(ends[-1] + enc.modality_latents[k])
        # The latent groups that label queries read: all latents, or each group on its own.
        self.label_slices = list(zip([0, *ends[:-1]], ends))
        self.label_group_modality = [None] + [k for k in names if enc.modality_latents.get(k, 0)]
        if config.num_classes:
            self.label_query = nn.Parameter(0.02 * torch.randn(1, len(self.label_slices), c))
            self.label_decoder = CrossAttention(c, c, num_heads=config.labels.heads, widening_factor=1)
            self.label_head = nn.Linear(c, config.num_classes)
            self.label_pools = nn.ModuleDict()
            for k in config.labels.pool:
                a, b = self.preprocess.adapters[k].pool_channels
                self.label_pools[k] = nn.Sequential(nn.LayerNorm(b - a), nn.Linear(b - a, c))
            # Each pooled read is scaled by a gate that starts shut: a model's outputs are unchanged
            # by adding one. (A zero projection instead ties every token in the max, and the
            # read did not learn: held-out shape at chance after 1000 pool steps.)
            if config.labels.pool:
                self.pool_gates = nn.Parameter(torch.zeros(len(config.labels.pool)))
        if config.flow is not None:
            fc = config.flow.channels
            self.flow_input = FlowInputAdapter(config.flow.size, config.flow.corr_radius)
            # Linear(concat(patch, pos)) split in two so the position half is computed once.
            self.flow_patch_proj = nn.Linear(self.flow_input.out_channels, fc)
            self.flow_pos_proj = nn.Linear(fourier_channels(2, config.flow.pos_bands), fc, bias=False)
            hq = config.flow.query_hidden
            self.flow_query_conv = nn.Sequential(
                nn.Conv2d(6, hq, 3, padding=1), nn.GELU(), nn.Conv2d(hq, fc, 3, padding=1)
            ) if hq else None
            self.flow_decoder = CrossAttention(
                fc, c, qk_channels=fc, v_channels=fc, num_heads=1, widening_factor=config.flow.widening
            )
            self.flow_head = nn.Linear(fc, 2)
        self._cache = _Cache()

    # -- pieces -------------------------------------------------------------------------------

    def initial_latents(self, state: torch.Tensor | None, reset: torch.Tensor) -> torch.Tensor | None:
        """Seed latents ``B x M x C`` from the previous window's state, or None for the learned ones.

        Rows with ``reset`` True start from the learned latents alone.
        """
        if state is None or not self.config.state.carry or bool(reset.all()):
            return None
        carry = (~reset).to(state.device)[:, None, None]
        seed = torch.sigmoid(self.state_gate) * self.state_proj(self.state_norm(state))
        return self.latents[None] + torch.where(carry, seed, 0.0)

    def encode(self, batch: Batch, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's latents and the tower's output ``z``, the latents that end each window
        (both ``B x M x C``)."""
        return self._encode(self.preprocess(batch), batch.reset, state)

    def _encode(
        self, tok: Tokens, reset: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self._cross(tok, reset, state)
        return encoded, self._tower(encoded)

    def _cross(self, tok: Tokens, reset: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """The encoder's latents ``B x M x C`` (the cross-attention onto the tokens)."""
        own = self.latent_modality if self.config.encoder.modality_latents else None
        latents = self.initial_latents(state, reset)
        if latents is None:
            q = self._cache.get(
                "latent_q", [self.latents, *self.encoder.q_norm.parameters(), *self.encoder.attn.q.parameters()],
                self.latents.device, lambda: self.encoder.query_heads(self.latents[None]),
            )
            return self.encoder(self.latents[None], tok.tokens, tok.mask, self.preprocess.token_modality(tok), q_heads=q,
                                query_source=own)
        return self.encoder(latents, tok.tokens, tok.mask, self.preprocess.token_modality(tok), query_source=own)

    def _tower(self, z: torch.Tensor) -> torch.Tensor:
        for _ in range(self.config.encoder.num_blocks):
            for layer in self.tower:
                z = layer(z)
        return z

    def _flow_pos(self, device: torch.device) -> torch.Tensor:
        cfg = self.config.flow
        size = (cfg.size[0] // cfg.stride, cfg.size[1] // cfg.stride)
        return self._cache.get(
            "flow_pos", [self.flow_pos_proj.weight], device,
            lambda: self.flow_pos_proj(grid_fourier_features(size, cfg.pos_bands, device=device)),
        )

    def decode_flow(self, batch: Batch, z: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Flow ``B x H x W x 2`` (px, dx right, dy down; zeros where invalid) and ``B`` validity."""
        b = z.shape[0]
        cfg = self.config.flow
        m = None if cfg is None else batch.modalities.get(cfg.modality)
        if m is None or not bool(m.present.any()):
            return None, torch.zeros(b, dtype=torch.bool, device=z.device)
        frames, valid = self.flow_input.last_frames(m)
        valid, frames = valid.to(z.device), frames.to(z.device)
        # Rows without two frames are left out of the decoder (no gather / scatter when all have them).
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        if rows is not None:
            if rows.numel() == 0:
                return None, valid
            frames, z = frames[rows], z[rows]
        n = z.shape[0]
        s = cfg.stride
        if s > 1:
            x = F.avg_pool2d(frames.flatten(0, 1).permute(0, 3, 1, 2).float(), s)
            frames = x.permute(0, 2, 3, 1).reshape(n, 2, *x.shape[2:], 3)
        h, w = frames.shape[2:4]
        queries = self.flow_input.project(frames, self.flow_patch_proj)
        if self.flow_query_conv is not None:
            pair = normalise_frames(frames).permute(0, 1, 4, 2, 3).reshape(n, 6, h, w)
            queries = queries + self.flow_query_conv(pair).permute(0, 2, 3, 1)
        queries = queries.reshape(n, h * w, -1) + self._flow_pos(z.device)
        out = self.flow_head(self.flow_decoder(queries, z, query_chunk=cfg.chunk)) * cfg.scale
        out = out.reshape(n, h, w, 2)
        if s > 1:
            out = F.interpolate(out.permute(0, 3, 1, 2), scale_factor=s, mode="bilinear", align_corners=False)
            out = out.permute(0, 2, 3, 1)
        flow = out if rows is None else out.new_zeros(b, *out.shape[1:]).index_copy(0, rows, out)
        return flow, valid

    def label_terms(self, z: torch.Tensor) -> torch.Tensor:
        """Each latent group's label read ``B x G x C`` (one group, all latents, without ``label_groups``)."""
        read = [self.label_decoder(self.label_query[:, g : g + 1], z[:, a:b])[:, 0]
                for g, (a, b) in enumerate(self.label_slices)]
        return torch.stack(read, dim=1)

    def pooled_terms(self, tok: Tokens) -> torch.Tensor:
        """Each ``label_pool`` modality's max-pooled read ``B x P x C`` (zero in rows without its tokens)."""
        b, c = tok.mask.shape[0], self.config.encoder.latent_channels
        reads = []
        for k in self.config.labels.pool:
            if k not in tok.without_pos:  # absent from the whole batch
                reads.append(self.latents.new_zeros(b, c))
                continue
            feats, mask = tok.without_pos[k], tok.mask[:, tok.span(k)]
            x = self.label_pools[k](feats)  # B x n x C
            pooled = torch.where(mask[..., None], x, float("-inf")).amax(dim=1)
            reads.append(torch.where(mask.any(dim=1, keepdim=True), pooled, 0.0))
        return torch.stack(reads, dim=1) * self.pool_gates[:, None]

    def pool_parameters(self) -> list[nn.Parameter]:
        """The parameters of the ``label_pool`` reads (their projections, their gates and the
        adapters' layers that make the pooled channels): what ``train.pool_steps`` trains, and only that."""
        params = [p for k in self.config.labels.pool for p in self.preprocess.adapters[k].pool_parameters()]
        if self.config.num_classes and self.config.labels.pool:
            params += [*self.label_pools.parameters(), self.pool_gates]
        return params

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """The window embedding ``B x C``: mean over latents of ``LayerNorm(z)`` (not L2-normalised)."""
        return self.final_norm(z).mean(dim=1)

    # -- the model ----------------------------------------------------------------------------

    def forward(self, batch: Batch, state: torch.Tensor | None = None) -> ModelOutput:
        """Outputs for ``batch``; ``state`` (``B x M x C``, from the previous window of each row's
        stream, e.g. ``StreamStates.gather``) seeds the latents where ``batch.reset`` is False."""
        tok = self.preprocess(batch)
        encoded, z = self._encode(tok, batch.reset, state)
        flow, flow_valid = self.decode_flow(batch, z)
        group_logits = group_valid = None
        if not self.config.num_classes:
            logits = z.new_zeros(z.shape[0], 0)
        else:
            terms = self.label_terms(encoded)
            read = terms.sum(dim=1)
            if self.config.labels.pool:
                read = read + self.pooled_terms(tok).sum(dim=1)
            logits = self.label_head(read)
            group_logits = self.label_head(terms).float()
            group_valid = torch.stack([self._present(batch, k) for k in self.label_group_modality], dim=1)
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
        """The latent groups' summed label read ``B x C`` (no flow decoded). ``label_head`` of it
        plus `pooled_label_read` gives ``forward(batch, state).label_logits``."""
        tok = self.preprocess(batch)
        read = self._cross(tok, batch.reset, state)
        return self.label_terms(read).sum(dim=1)

    def pooled_label_read(self, batch: Batch) -> torch.Tensor:
        """The ``label_pool`` reads' sum ``B x C`` (from those modalities' adapters alone)."""
        pooled = {k: m for k, m in batch.modalities.items() if k in self.config.labels.pool}
        return self.pooled_terms(self.preprocess(replace(batch, modalities=pooled))).sum(dim=1)

    def _present(self, batch: Batch, modality: str | None) -> torch.Tensor:
        """``B`` bool: rows where ``modality`` is present (every row for None, the shared latents)."""
        b, device = len(batch), self.latents.device
        if modality is None:
            return torch.ones(b, dtype=torch.bool, device=device)
        m = batch.modalities.get(modality)
        return torch.zeros(b, dtype=torch.bool, device=device) if m is None else m.present.to(device)

    def modality_gates(self) -> dict[str, torch.Tensor]:
        """Each modality's encoder gate, ``sigmoid(gate)`` per head (1 = full share of attention)."""
        g = torch.sigmoid(self.encoder.gate.detach())
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
