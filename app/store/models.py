"""SQLAlchemy 2 models of the feature store.

One row per model, activation capture, SAE, latent, explanation and job. Bulky
per-latent arrays (histogram, logit effects, neighbours) are JSON columns: they are always
read whole with their row, never queried inside, and JSON keeps the schema identical on
SQLite and PostgreSQL. A latent's example windows are one packed binary value in
``latent_examples`` (``app.store.example_pack``). Everything that is
sorted or filtered on (density, max activation, index) is a real, indexed column.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.store.example_pack import ExamplePack, StoredExample


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict] = {dict[str, Any]: JSON, list[Any]: JSON}


class Model(Base):
    """A language model that activations were captured from."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    d_model: Mapped[int]
    n_layers: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    saes: Mapped[list[Sae]] = relationship(back_populates="model")


class Capture(Base):
    """An activation capture directory on disk."""

    __tablename__ = "captures"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text, unique=True)
    layer: Mapped[int]
    dataset: Mapped[str] = mapped_column(Text)
    context: Mapped[int]
    tokens: Mapped[int]
    dtype: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Sae(Base):
    """A trained SAE: its folder on disk, config and training/eval metrics."""

    __tablename__ = "saes"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"),
                                          index=True)
    capture_id: Mapped[int | None] = mapped_column(
        ForeignKey("captures.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(300))
    path: Mapped[str] = mapped_column(Text, unique=True)
    architecture: Mapped[str] = mapped_column(String(32))
    layer: Mapped[int]
    d_in: Mapped[int]
    n_latents: Mapped[int]
    k: Mapped[int | None]
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    analysed_tokens: Mapped[int | None]
    dead_share: Mapped[float | None]
    """Share of latents that never fired over the ``analysed_tokens``."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    model: Mapped[Model] = relationship(back_populates="saes")
    latents: Mapped[list[Latent]] = relationship(back_populates="sae",
                                                 cascade="all, delete-orphan",
                                                 passive_deletes=True)


class Latent(Base):
    """One SAE latent and its analysis."""

    __tablename__ = "latents"
    __table_args__ = (
        Index("ix_latents_sae_index", "sae_id", "index", unique=True),
        Index("ix_latents_sae_density", "sae_id", "density"),
        Index("ix_latents_sae_max", "sae_id", "max_activation"),
        Index("ix_latents_sae_steerability", "sae_id", "steerability"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    density: Mapped[float] = mapped_column(Float)
    """Fraction of analysed tokens on which the latent fires."""
    mean_activation: Mapped[float] = mapped_column(Float)
    """Mean over the tokens where it fires."""
    max_activation: Mapped[float] = mapped_column(Float)
    histogram: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """{"edges": [...], "counts": [...]} over linear bins fitted to the latent's range."""
    top_logits: Mapped[list[Any]] = mapped_column(default=list)
    """[[token, effect], ...]: the largest positive effects of W_dec[f] on the logits."""
    bottom_logits: Mapped[list[Any]] = mapped_column(default=list)
    neighbours: Mapped[list[Any]] = mapped_column(default=list)
    """[[latent index, cosine], ...] of the nearest decoder directions."""
    explanation: Mapped[str | None] = mapped_column(Text)
    """The current best explanation (copied from ``explanations`` for listing/search)."""
    sink: Mapped[bool] = mapped_column(Boolean, default=False)
    """An attention-sink / massive-activation latent (``training.analysis.sinks``)."""
    sink_reason: Mapped[str | None] = mapped_column(Text)
    steerability: Mapped[float | None] = mapped_column(Float)
    """Share of steer-eval prompts on which clamping it made the output carry it (None:
    not measured)."""
    steer_eval: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    """The steer-eval record: best strength, bound, prompts, per-strength figures."""
    cofiring: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True))
    """[[latent index, Jaccard, P(other | this)], ...]: the latents firing on the same
    tokens most often, over the analysis' co-firing sample."""
    map_x: Mapped[float | None] = mapped_column(Float)
    map_y: Mapped[float | None] = mapped_column(Float)
    """Feature-map position (UMAP of the decoder directions)."""
    sae: Mapped[Sae] = relationship(back_populates="latents")
    example_pack: Mapped[LatentExamples | None] = relationship(
        back_populates="latent", cascade="all, delete-orphan", passive_deletes=True)

    @property
    def examples(self) -> list[StoredExample]:
        """Every example window (top examples by rank, then the quantile buckets from the
        lowest), decoded from the packed row (loaded on first use unless the query
        loaded ``example_pack``)."""
        pack = self.example_pack
        return ExamplePack(pack.data if pack else None).examples()


class LatentExamples(Base):
    """A latent's example windows, packed into one value (``app.store.example_pack``):
    the context windows around the tokens where it fired most, and samples from each
    quantile bucket of its activations."""

    __tablename__ = "latent_examples"
    latent_id: Mapped[int] = mapped_column(ForeignKey("latents.id", ondelete="CASCADE"),
                                           primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    """How many examples the pack holds."""
    data: Mapped[bytes] = mapped_column(LargeBinary)
    latent: Mapped[Latent] = relationship(back_populates="example_pack")


class Explanation(Base):
    """A natural-language explanation of a latent and how well it scored."""

    __tablename__ = "explanations"
    __table_args__ = (Index("ix_explanations_settings", "latent_id", "settings_key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    latent_id: Mapped[int] = mapped_column(ForeignKey("latents.id", ondelete="CASCADE"),
                                           index=True)
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(100))
    """Who wrote it: the explainer model's name, ``human`` or ``import``."""
    score: Mapped[float | None]
    """The headline score: the mean of detection and fuzzing when both were measured."""
    detection_score: Mapped[float | None]
    """Balanced accuracy of telling held-out activating contexts from non-activating ones
    given only the explanation."""
    fuzzing_score: Mapped[float | None]
    """Balanced accuracy of telling correctly marked activating tokens from randomly
    marked ones given only the explanation."""
    simulation_score: Mapped[float | None]
    """Correlation of the activations simulated from the explanation with the true ones
    over the held-out windows' tokens."""
    detection_n: Mapped[int | None]
    """Held-out questions behind the detection score (activating + non-activating)."""
    fuzzing_n: Mapped[int | None]
    """Held-out questions behind the fuzzing score (correct + random marks)."""
    simulation_n: Mapped[int | None]
    """Held-out windows behind the simulation score."""
    settings_key: Mapped[str | None] = mapped_column(String(64))
    """Hash of the explainer settings (explainer, model, prompt version, example counts):
    a re-run with the same settings skips latents that already have one."""
    usage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Requests, input/output tokens and cost (USD) spent on this explanation."""
    embedding: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True))
    """The text's sentence embedding (unit norm) for semantic search."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """A queued or finished background job (capture, train, analyse, explain)."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_created", "state", "created_at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    """queued, running, succeeded, failed or cancelled."""
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(Text)
    series: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Metric time series, e.g. {"step": [...], "fvu": [...]}."""
    stage: Mapped[str | None] = mapped_column(String(32))
    """The running stage (capture, train, analyze) of the job."""
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Live figures of the stage: tokens_per_s, loss, eta_s."""
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """What the job made: {"acts": path, "sae": path, "sae_id": id}, filled stage by stage."""
    log: Mapped[str] = mapped_column(Text, default="")
    """The last lines the job logged."""
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Refreshed every few seconds while a worker runs the job; a stale one means the
    worker died and the reaper takes over."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SteerPreset(Base):
    """A saved steering: an SAE and its latent edits, usable as a model name
    (``preset-<id>``) by the OpenAI-compatible API and reloadable on the steer page."""

    __tablename__ = "steer_presets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"), index=True)
    latents: Mapped[list[Any]] = mapped_column(default=list)
    """[{"index", "mode", "value"}, ...] as on the steer page."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LatentList(Base):
    """A named list of latents (of any SAEs), each with a note."""

    __tablename__ = "latent_lists"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    items: Mapped[list[ListItem]] = relationship(back_populates="list",
                                                 cascade="all, delete-orphan",
                                                 passive_deletes=True, order_by="ListItem.id")


class ListItem(Base):
    __tablename__ = "list_items"
    __table_args__ = (UniqueConstraint("list_id", "sae_id", "latent_index",
                                       name="uq_list_item"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    list_id: Mapped[int] = mapped_column(ForeignKey("latent_lists.id", ondelete="CASCADE"),
                                         index=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    latent_index: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    list: Mapped[LatentList] = relationship(back_populates="items")
