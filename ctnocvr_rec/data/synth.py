"""`ctnocvr data synth`: synthetic Ali-CCP raw files with a known ground truth.

Writes, into ``--out``, exactly the official raw layout (no header line, as in the official files):

* ``sample_skeleton_{train,test}.csv``: ``sample_id,click,buy,common_feature_index,feature_num,feature_list``
  (one line per impression; item, combination and context fields);
* ``common_features_{train,test}.csv``: ``common_feature_index,feature_num,feature_list``
  (one line per request; user fields, incl. the multi-valued weighted 14-day histories);
* ``ground_truth_{train,test}.parquet``: ``sample_id, item_id, segment, p_ctr, p_cvr``: the true
  click and post-click conversion probabilities of every impression, the raw field-205 item id and
  the item's planted segment (``normal | clickbait | gem``);
* ``synth_config.json``: every parameter, the derived intercepts and realised rates.

``feature_list`` items are ``field\\x02feature_id\\x03value`` joined by ``\\x01``. Feature ids are
global integers, disjoint between fields (as in the real data); ``value`` is ``1.0`` for unweighted
fields and a ``log(1 + count)`` weight for weighted ones.

The generative model (all effects on the logit scale; fields come from the schema, see
:func:`_field_roles` for how each schema field gets its role):

* items have an *appeal* (drives clicks) and a *quality* (drives conversions), each the sum of
  attribute effects (category, shop, brand, intention node), a per-item effect and a segment shift:
  clickbait items get ``+ctr_shift`` appeal and ``-cvr_shift`` quality, hidden gems the reverse;
* users have a click bias and a buy bias (attribute effects + a per-user effect) and histories:
  counts of the categories/shops/brands/nodes of ~``history_length`` past items drawn from a few
  preferred categories; the history weight is ``log(1 + count)``;
* a request is one user and a few candidate items (about half from the user's preferred categories);
  a combination field is present when the item's attribute is in the user's paired history
  (its id encodes the attribute value and a count bucket, its weight is the history weight), and its
  match strength raises CTR and CVR;
* the context field (position) shifts CTR only;
* ``p_ctr = sigmoid(b_ctr + s * (appeal + user_click_bias + matches + position))`` with the
  *selection strength* ``s`` (``--selection-strength``, default 1): how strongly clicking selects
  impressions by their features. ``s = 0`` makes clicks a uniform random sample of the impressions
  (no sample selection bias: the clicked rows the CVR task trains on look like all impressions);
  larger ``s`` concentrates clicks (and hence the CVR training rows) on high-appeal impressions,
  which include the clickbait items and, through the history matches, the items users buy;
  ``p_cvr = sigmoid(b_cvr + quality + user_buy_bias + matches)``; the intercepts are solved so that
  the mean pCTR is ``--ctr`` and the click-weighted mean pCVR is ``--cvr``;
* ``click ~ Bernoulli(p_ctr)``, ``buy = click * Bernoulli(p_cvr)``: ``click=0, buy=1`` never occurs.

Deterministic by ``--seed``: entities and every fixed-size block of requests draw from their own
``SeedSequence``; the test split uses the same users and items with different requests.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctnocvr_rec.data.schema import DEFAULT_SCHEMA, FieldSchema, FieldSpec, load_schema

SEGMENTS = ("normal", "clickbait", "gem")
SEGMENT_NORMAL, SEGMENT_CLICKBAIT, SEGMENT_GEM = 0, 1, 2
SPLITS = ("train", "test")

#: requests per generation block; fixed (not a CLI knob) so that the output depends only on the seed
REQUESTS_PER_BLOCK = 4096
#: Ali-CCP's documented pairing of the 14-day user histories with item attributes, and of the
#: combination fields with the histories; other schemas pair by position (see _field_roles)
KNOWN_HISTORY_ATTR = {"109_14": "206", "110_14": "207", "127_14": "216", "150_14": "210"}
KNOWN_COMBINATION_HISTORY = {"508": "109_14", "509": "110_14", "702": "127_14", "853": "150_14"}
#: cardinalities of user attribute fields (after the user id), cycled in schema order
USER_ATTR_CARDINALITIES = (97, 3, 7, 12, 5, 4, 4, 3, 6)
#: combination ids encode (attribute value, count bucket); buckets: count 1 | 2-3 | >=4
COUNT_BUCKET_EDGES = np.array([2, 4])
MAX_WEIGHT_COUNT = 256  # weights are written from a lookup table of log(1 + count)


@dataclass
class SynthConfig:
    """Every knob of the generator (written to ``synth_config.json``)."""

    rows_train: int = 200_000
    rows_test: int = 50_000
    users: int = 20_000
    items: int = 5_000
    seed: int = 0
    #: target mean pCTR over impressions
    ctr: float = 0.04
    #: target mean pCVR over clicks (200k rows at 4% CTR give ~2.4k conversions)
    cvr: float = 0.3
    clickbait_share: float = 0.1
    gem_share: float = 0.1
    #: segment shifts on the logit scale: clickbait +ctr_shift/-cvr_shift, gem -ctr_shift/+cvr_shift
    segment_ctr_shift: float = 1.2
    segment_cvr_shift: float = 1.5
    #: scale of the click logit's feature part (intercept re-solved): 0 = clicks at random (no
    #: sample selection bias), 1 = the default world, > 1 = more selective clicking
    selection_strength: float = 1.0
    #: mean candidate items per request (rows are grouped by request, as in Ali-CCP)
    mean_request_size: float = 20.0
    #: mean number of past items behind a user's 14-day histories (cold-start users have none)
    history_length: float = 30.0
    cold_user_share: float = 0.05
    #: preferred categories per user
    preferred_categories: int = 3
    #: share of a request's candidates drawn from the user's preferred categories
    preferred_candidate_share: float = 0.5
    #: share of users missing each optional user attribute (absent fields stay absent in the file)
    missing_attr_share: float = 0.03
    schema: str = DEFAULT_SCHEMA  # packaged field schema name, or a YAML path
    #: filled in by the generator
    derived: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Field roles: how the schema's fields map onto the generative model
# --------------------------------------------------------------------------------------------


@dataclass
class _Roles:
    user_id: FieldSpec
    user_attrs: list[FieldSpec]
    histories: list[FieldSpec]
    item_id: FieldSpec
    item_attrs: list[FieldSpec]
    combinations: list[FieldSpec]
    contexts: list[FieldSpec]
    history_attr: dict[str, str]  # history field -> item attribute field
    combination_history: dict[str, str]  # combination field -> history field


def _field_roles(schema: FieldSchema) -> _Roles:
    """Give each schema field its role; the field list itself always comes from the schema.

    user group: the field named ``101`` (else the first single-valued one) is the user id, the other
    single-valued fields are attributes, multi-valued ones are histories. item group: ``205`` (else
    the first single-valued) is the item id, the rest are attributes (the first is the category).
    Histories and combinations are paired by Ali-CCP's documented names, otherwise by position.
    """

    def pick_id(specs: list[FieldSpec], preferred: str, group: str) -> FieldSpec:
        singles = [s for s in specs if not s.multi_valued]
        if not singles:
            raise ValueError(f"schema {schema.source}: group {group!r} needs a single-valued id field")
        return next((s for s in singles if s.name == preferred), singles[0])

    users = schema.by_group("user")
    items = schema.by_group("item")
    user_id = pick_id(users, "101", "user")
    item_id = pick_id(items, "205", "item")
    user_attrs = [s for s in users if s is not user_id and not s.multi_valued]
    histories = [s for s in users if s.multi_valued]
    item_attrs = [s for s in items if s is not item_id]
    if not item_attrs:
        raise ValueError(f"schema {schema.source}: the item group needs an attribute besides the item id")
    attr_names = [s.name for s in item_attrs]
    history_attr = {}
    for k, h in enumerate(histories):
        known = KNOWN_HISTORY_ATTR.get(h.name)
        history_attr[h.name] = known if known in attr_names else attr_names[k % len(attr_names)]
    combinations = schema.by_group("combination")
    combination_history = {}
    if combinations and not histories:
        raise ValueError(f"schema {schema.source}: combination fields need user history fields")
    hist_names = [h.name for h in histories]
    for k, c in enumerate(combinations):
        known = KNOWN_COMBINATION_HISTORY.get(c.name)
        combination_history[c.name] = known if known in hist_names else hist_names[k % len(hist_names)]
    return _Roles(
        user_id, user_attrs, histories, item_id, item_attrs, combinations, schema.by_group("context"),
        history_attr, combination_history,
    )


# --------------------------------------------------------------------------------------------
# The world: users and items with their latent effects
# --------------------------------------------------------------------------------------------


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Popularity weights ~ rank^-exponent over a random order of ``n`` entities (sum 1)."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    w = w[rng.permutation(n)]
    return w / w.sum()


def _sample(cdf: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` indices from the distribution with cumulative sums ``cdf`` (fast rng.choice)."""
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), len(cdf) - 1)


@dataclass
class _Csr:
    """Per-entity lists: entity ``e`` holds ``values[offsets[e]:offsets[e+1]]``."""

    offsets: np.ndarray
    values: np.ndarray

    @property
    def first(self) -> np.ndarray:
        return self.values[self.offsets[:-1]]


@dataclass
class _History:
    """One user history field as sorted keys ``user * cardinality + value`` with their counts."""

    attr: str
    cardinality: int
    keys: np.ndarray
    counts: np.ndarray
    user_offsets: np.ndarray

    def lookup(self, users: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Count of ``values`` in the histories of ``users`` (0 when absent), vectorised."""
        q = users.astype(np.int64) * self.cardinality + values
        idx = np.searchsorted(self.keys, q)
        idx_c = np.minimum(idx, max(len(self.keys) - 1, 0))
        if len(self.keys) == 0:
            return np.zeros(len(q), dtype=np.int64)
        found = self.keys[idx_c] == q
        return np.where(found, self.counts[idx_c], 0)


@dataclass
class _World:
    roles: _Roles
    cardinality: dict[str, int]
    id_offset: dict[str, int]  # raw feature id = id_offset[field] + local value
    item_attr: dict[str, _Csr]
    item_appeal: np.ndarray
    item_quality: np.ndarray
    item_segment: np.ndarray
    item_popularity_cdf: np.ndarray
    category_items: _Csr  # items of each category (category = first item attribute)
    user_attr: dict[str, np.ndarray]  # -1 = absent
    user_click_bias: np.ndarray
    user_buy_bias: np.ndarray
    user_activity_cdf: np.ndarray
    user_preferred: np.ndarray  # [U, P] category ids
    histories: dict[str, _History]
    history_ctr_effect: dict[str, float]
    history_cvr_effect: dict[str, float]
    context_probs: dict[str, np.ndarray]
    context_ctr_effect: dict[str, np.ndarray]


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def _build_world(cfg: SynthConfig, schema: FieldSchema) -> _World:
    roles = _field_roles(schema)
    rng = _rng(cfg.seed, 1)
    n_users, n_items = cfg.users, cfg.items
    if n_users < 1 or n_items < 1:
        raise ValueError(f"synth: --users and --items must be >= 1 (got {n_users}, {n_items})")

    # ---- cardinalities: items' attributes scale with the item count (category, shop, brand, node)
    card: dict[str, int] = {roles.user_id.name: n_users, roles.item_id.name: n_items}
    attr_divisors = (50, 10, 30, 20)
    for k, spec in enumerate(roles.item_attrs):
        card[spec.name] = max(4, n_items // attr_divisors[k % len(attr_divisors)])
    # every category must hold an item (users draw candidates from their preferred categories)
    card[roles.item_attrs[0].name] = min(card[roles.item_attrs[0].name], n_items)
    for k, spec in enumerate(roles.user_attrs):
        card[spec.name] = USER_ATTR_CARDINALITIES[k % len(USER_ATTR_CARDINALITIES)]
    for h in roles.histories:
        card[h.name] = card[roles.history_attr[h.name]]
    for c in roles.combinations:
        card[c.name] = card[roles.combination_history[c.name]] * (len(COUNT_BUCKET_EDGES) + 1)
    for spec in roles.contexts:
        card[spec.name] = 3
    id_offset: dict[str, int] = {}
    next_id = 1
    for spec in schema:  # disjoint global feature-id ranges, in schema order
        id_offset[spec.name] = next_id
        next_id += card[spec.name] + 1

    # ---- items
    category = roles.item_attrs[0].name
    n_cat = card[category]
    item_attr: dict[str, _Csr] = {}
    appeal = rng.normal(0.0, 0.6, n_items)
    quality = rng.normal(0.0, 0.6, n_items)
    attr_ctr_scale, attr_cvr_scale = (0.5, 0.1, 0.2, 0.1), (0.1, 0.4, 0.1, 0.4)
    for k, spec in enumerate(roles.item_attrs):
        kcard = card[spec.name]
        if k == 0:  # every category has at least one item
            first = np.concatenate([np.arange(min(kcard, n_items)), _sample(
                np.cumsum(_zipf_weights(kcard, 1.0, rng)), max(n_items - kcard, 0), rng)])
            first = first[rng.permutation(n_items)] if n_items > kcard else first
        else:
            first = _sample(np.cumsum(_zipf_weights(kcard, 1.0, rng)), n_items, rng)
        if spec.multi_valued:  # 1-3 values, the first one tied to the item's first value
            extra = rng.integers(0, 3, n_items)
            lengths = 1 + extra
            offsets = np.zeros(n_items + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            values = rng.integers(0, kcard, offsets[-1])
            values[offsets[:-1]] = first
            item_attr[spec.name] = _Csr(offsets, values.astype(np.int64))
        else:
            item_attr[spec.name] = _Csr(np.arange(n_items + 1, dtype=np.int64), first.astype(np.int64))
        val_first = item_attr[spec.name].first
        appeal += rng.normal(0.0, attr_ctr_scale[k % 4], kcard)[val_first]
        quality += rng.normal(0.0, attr_cvr_scale[k % 4], kcard)[val_first]
    u = rng.random(n_items)
    segment = np.full(n_items, SEGMENT_NORMAL, dtype=np.int8)
    segment[u < cfg.clickbait_share] = SEGMENT_CLICKBAIT
    segment[(u >= cfg.clickbait_share) & (u < cfg.clickbait_share + cfg.gem_share)] = SEGMENT_GEM
    appeal += np.where(segment == SEGMENT_CLICKBAIT, cfg.segment_ctr_shift, 0.0)
    appeal -= np.where(segment == SEGMENT_GEM, cfg.segment_ctr_shift, 0.0)
    quality -= np.where(segment == SEGMENT_CLICKBAIT, cfg.segment_cvr_shift, 0.0)
    quality += np.where(segment == SEGMENT_GEM, cfg.segment_cvr_shift, 0.0)
    item_pop_cdf = np.cumsum(_zipf_weights(n_items, 0.8, rng))
    cat_of_item = item_attr[category].first
    order = np.argsort(cat_of_item, kind="stable")
    cat_offsets = np.searchsorted(cat_of_item[order], np.arange(n_cat + 1))
    category_items = _Csr(cat_offsets.astype(np.int64), order.astype(np.int64))

    # ---- users
    user_attr: dict[str, np.ndarray] = {}
    click_bias = rng.normal(0.0, 0.3, n_users)
    buy_bias = rng.normal(0.0, 0.3, n_users)
    for k, spec in enumerate(roles.user_attrs):
        kcard = card[spec.name]
        vals = _sample(np.cumsum(_zipf_weights(kcard, 0.7, rng)), n_users, rng).astype(np.int64)
        click_bias += rng.normal(0.0, 0.15, kcard)[vals]
        buy_bias += rng.normal(0.0, 0.15, kcard)[vals]
        if k > 0:  # the first attribute is always present, the others occasionally missing
            vals[rng.random(n_users) < cfg.missing_attr_share] = -1
        user_attr[spec.name] = vals
    activity_cdf = np.cumsum(_zipf_weights(n_users, 0.6, rng))
    cat_pop_cdf = np.cumsum(_zipf_weights(n_cat, 0.8, rng))
    preferred = _sample(cat_pop_cdf, n_users * cfg.preferred_categories, rng).reshape(
        n_users, cfg.preferred_categories)

    # past items behind the histories: drawn from each user's preferred categories
    n_past = rng.poisson(cfg.history_length, n_users)
    n_past[rng.random(n_users) < cfg.cold_user_share] = 0
    past_user = np.repeat(np.arange(n_users, dtype=np.int64), n_past)
    past_cat = preferred[past_user, rng.integers(0, cfg.preferred_categories, len(past_user))]
    past_item = _pick_in_category(category_items, past_cat, rng)
    histories: dict[str, _History] = {}
    for h in roles.histories:
        attr = item_attr[roles.history_attr[h.name]]
        kcard = card[h.name]
        lengths = np.diff(attr.offsets)[past_item]
        users_rep = np.repeat(past_user, lengths)
        starts = np.repeat(attr.offsets[past_item], lengths)
        within = np.arange(len(starts)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        vals = attr.values[starts + within]
        keys, counts = np.unique(users_rep * kcard + vals, return_counts=True)
        user_offsets = np.searchsorted(keys, np.arange(n_users + 1, dtype=np.int64) * kcard)
        histories[h.name] = _History(roles.history_attr[h.name], kcard, keys, counts, user_offsets)
    hist_ctr, hist_cvr = (0.5, 0.15, 0.15, 0.3), (0.15, 0.4, 0.3, 0.1)
    contexts = {spec.name: np.array([0.5, 0.3, 0.2]) for spec in roles.contexts}
    context_effect = {spec.name: np.array([0.3, 0.0, -0.3]) for spec in roles.contexts}
    return _World(
        roles=roles, cardinality=card, id_offset=id_offset, item_attr=item_attr,
        item_appeal=appeal, item_quality=quality, item_segment=segment,
        item_popularity_cdf=item_pop_cdf, category_items=category_items,
        user_attr=user_attr, user_click_bias=click_bias, user_buy_bias=buy_bias,
        user_activity_cdf=activity_cdf, user_preferred=preferred, histories=histories,
        history_ctr_effect={h.name: hist_ctr[k % 4] for k, h in enumerate(roles.histories)},
        history_cvr_effect={h.name: hist_cvr[k % 4] for k, h in enumerate(roles.histories)},
        context_probs=contexts, context_ctr_effect=context_effect,
    )


def _pick_in_category(category_items: _Csr, cats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn item of each category in ``cats`` (every category is non-empty)."""
    start = category_items.offsets[cats]
    count = category_items.offsets[cats + 1] - start
    return category_items.values[start + (rng.random(len(cats)) * count).astype(np.int64)]


# --------------------------------------------------------------------------------------------
# Impressions
# --------------------------------------------------------------------------------------------


@dataclass
class _Impressions:
    request_user: np.ndarray  # [R]
    request_of_row: np.ndarray  # [N] index into the block's requests
    user: np.ndarray  # [N]
    item: np.ndarray  # [N]
    context: dict[str, np.ndarray]  # field -> [N] value
    match_count: dict[str, np.ndarray]  # history field -> [N] count of the item's attribute
    logit_ctr: np.ndarray  # [N] without intercept
    logit_cvr: np.ndarray  # [N] without intercept


def _impressions(world: _World, cfg: SynthConfig, sizes: np.ndarray, rng: np.random.Generator) -> _Impressions:
    n_req = len(sizes)
    req_user = _sample(world.user_activity_cdf, n_req, rng).astype(np.int64)
    req_of_row = np.repeat(np.arange(n_req, dtype=np.int64), sizes)
    user = req_user[req_of_row]
    n = len(user)
    from_pref = rng.random(n) < cfg.preferred_candidate_share
    cats = world.user_preferred[user, rng.integers(0, world.user_preferred.shape[1], n)]
    item = np.where(
        from_pref,
        _pick_in_category(world.category_items, cats, rng),
        _sample(world.item_popularity_cdf, n, rng),
    ).astype(np.int64)
    logit_ctr = world.item_appeal[item] + world.user_click_bias[user]
    logit_cvr = world.item_quality[item] + world.user_buy_bias[user]
    match: dict[str, np.ndarray] = {}
    for name, hist in world.histories.items():
        count = hist.lookup(user, world.item_attr[hist.attr].first[item])
        match[name] = count
        strength = np.log1p(count)
        logit_ctr += world.history_ctr_effect[name] * strength
        logit_cvr += world.history_cvr_effect[name] * strength
    context: dict[str, np.ndarray] = {}
    for name, probs in world.context_probs.items():
        context[name] = _sample(np.cumsum(probs), n, rng)
        logit_ctr += world.context_ctr_effect[name][context[name]]
    if cfg.selection_strength != 1.0:  # skipped at 1 so that the default data stay byte-identical
        logit_ctr = logit_ctr * cfg.selection_strength
    return _Impressions(req_user, req_of_row, user, item, context, match, logit_ctr, logit_cvr)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _solve_intercept(target: float, fn) -> float:
    """Bisection for b with fn(b) = target, fn increasing in b."""
    lo, hi = -30.0, 30.0
    for _ in range(50):  # 60 / 2^50: far below any visible difference
        mid = 0.5 * (lo + hi)
        if fn(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _calibrate(world: _World, cfg: SynthConfig) -> tuple[float, float]:
    """Intercepts giving mean pCTR = cfg.ctr and click-weighted mean pCVR = cfg.cvr."""
    for name, rate in (("ctr", cfg.ctr), ("cvr", cfg.cvr)):
        if not 0.0 < rate < 1.0:
            raise ValueError(f"synth: --{name} must be in (0, 1), got {rate}")
    rng = _rng(cfg.seed, 2)
    sizes = _request_sizes(cfg, 100_000, rng)
    imp = _impressions(world, cfg, sizes, rng)
    b_ctr = _solve_intercept(cfg.ctr, lambda b: float(_sigmoid(imp.logit_ctr + b).mean()))
    p_ctr = _sigmoid(imp.logit_ctr + b_ctr)
    b_cvr = _solve_intercept(
        cfg.cvr, lambda b: float((p_ctr * _sigmoid(imp.logit_cvr + b)).sum() / p_ctr.sum()))
    return b_ctr, b_cvr


def _request_sizes(cfg: SynthConfig, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Candidates per request (>= 1, mean ~mean_request_size) summing to exactly ``rows``."""
    mean = max(cfg.mean_request_size, 1.0)
    parts = []
    total = 0
    while total < rows:
        draw = 1 + rng.poisson(mean - 1.0, int((rows - total) / mean) + 16)
        parts.append(draw)
        total += int(draw.sum())
    sizes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    cum = np.cumsum(sizes)
    n_req = int(np.searchsorted(cum, rows)) + 1 if rows > 0 else 0
    sizes = sizes[:n_req].astype(np.int64)
    if n_req:
        sizes[-1] -= int(cum[n_req - 1]) - rows
    return sizes


# --------------------------------------------------------------------------------------------
# Writing the raw format
# --------------------------------------------------------------------------------------------


def _piece_table(world: _World, name: str, value: str = "1.0") -> np.ndarray:
    """``field\\x02raw_id\\x03value`` for every local value of ``name`` (object array)."""
    off = world.id_offset[name]
    return np.array([f"{name}\x02{off + v}\x03{value}" for v in range(world.cardinality[name])], dtype=object)


#: weight text of count c at index c, and "" (absent) at the end
_WEIGHT_STR = np.array([f"{math.log1p(c):.5f}" for c in range(MAX_WEIGHT_COUNT + 1)] + [""], dtype=object)
#: ",click,buy," at index click + buy (click=0, buy=1 cannot occur)
_LABEL_STR = np.array([",0,0,", ",1,0,", ",1,1,"], dtype=object)


def _weight_strings(counts: np.ndarray) -> np.ndarray:
    return _WEIGHT_STR[np.minimum(counts, MAX_WEIGHT_COUNT)]


def _item_strings(world: _World, schema: FieldSchema) -> tuple[np.ndarray, np.ndarray]:
    """Feature-list text of every item's own fields (schema order) and its feature count."""
    roles = world.roles
    n_items = len(world.item_appeal)
    parts: list[np.ndarray] = []
    counts = np.zeros(n_items, dtype=np.int64)
    for spec in schema.by_group("item"):
        if spec is roles.item_id:
            parts.append(_piece_table(world, spec.name))
            counts += 1
            continue
        csr = world.item_attr[spec.name]
        table = _piece_table(world, spec.name)
        pieces = table[csr.values].tolist()
        off = csr.offsets.tolist()
        parts.append(np.array(["\x01".join(pieces[off[i]:off[i + 1]]) for i in range(n_items)], dtype=object))
        counts += np.diff(csr.offsets)
    joined = parts[0]
    for p in parts[1:]:
        joined = joined + "\x01" + p
    return joined, counts


def _user_strings(world: _World, schema: FieldSchema) -> tuple[np.ndarray, np.ndarray]:
    """Feature-list text of every user's fields (schema order) and its feature count."""
    roles = world.roles
    n_users = len(world.user_click_bias)
    columns: list[list[str]] = []
    counts = np.zeros(n_users, dtype=np.int64)
    for spec in schema.by_group("user"):
        if spec is roles.user_id:
            columns.append(_piece_table(world, spec.name).tolist())
            counts += 1
        elif spec.name in world.histories:
            hist = world.histories[spec.name]
            if spec.weighted:
                entries = (_piece_table(world, spec.name, "")[hist.keys % hist.cardinality]
                           + _weight_strings(hist.counts)).tolist()
            else:
                entries = _piece_table(world, spec.name)[hist.keys % hist.cardinality].tolist()
            off = hist.user_offsets.tolist()
            columns.append(["\x01".join(entries[off[u]:off[u + 1]]) for u in range(n_users)])
            counts += np.diff(hist.user_offsets)
        else:
            vals = world.user_attr[spec.name]
            table = np.append(_piece_table(world, spec.name), "")  # index -1 -> "" (absent)
            columns.append(table[vals].tolist())
            counts += vals >= 0
    # join the non-empty parts of each user
    text = ["\x01".join([p for p in row if p]) for row in zip(*columns)]
    return np.array(text, dtype=object), counts


def _count_bucket(counts: np.ndarray) -> np.ndarray:
    return np.searchsorted(COUNT_BUCKET_EDGES, counts, side="right")


def _request_keys(seed: int, split_code: int, request_index: np.ndarray) -> list[str]:
    """Distinct 16-hex-digit common_feature_index strings (a bijective 64-bit mix of the index)."""
    x = (request_index.astype(np.uint64) + np.uint64(split_code) * np.uint64(1 << 40)
         + np.uint64(seed % (1 << 20)) * np.uint64(1 << 44))
    with np.errstate(over="ignore"):  # splitmix64 finaliser: a bijection on uint64
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return [f"{v:016x}" for v in x.tolist()]


@dataclass
class SplitSummary:
    rows: int
    requests: int
    clicks: int
    conversions: int
    mean_p_ctr: float
    seconds: float
    segment_rates: dict[str, dict[str, float]]


GROUND_TRUTH_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("item_id", pa.int64()),
    ("segment", pa.dictionary(pa.int8(), pa.string())),
    ("p_ctr", pa.float64()),
    ("p_cvr", pa.float64()),
])


@dataclass
class _SplitJob:
    """Everything a block renderer needs (shared with forked workers through a module global)."""

    world: _World
    cfg: SynthConfig
    split_code: int
    sizes: np.ndarray
    block_request_start: np.ndarray  # first request index of each block
    block_sample_start: np.ndarray  # first sample_id of each block
    b_ctr: float
    b_cvr: float
    item_text: np.ndarray
    item_count: np.ndarray
    user_text: np.ndarray
    user_count: np.ndarray
    comb_tables: dict[str, np.ndarray]
    ctx_tables: dict[str, np.ndarray]


_JOB: _SplitJob | None = None


@dataclass
class _Block:
    skeleton: bytes
    common: bytes
    truth: dict[str, np.ndarray]
    clicks: int
    conversions: int
    p_ctr_sum: float
    segment_rows: np.ndarray
    segment_clicks: np.ndarray
    segment_conversions: np.ndarray


def _render_block(block: int) -> _Block:
    """Generate and format the impressions of one block of requests (pure function of the seed)."""
    job = _JOB
    assert job is not None
    world, cfg, roles = job.world, job.cfg, job.world.roles
    start = block * REQUESTS_PER_BLOCK
    block_sizes = job.sizes[start:start + REQUESTS_PER_BLOCK]
    rng = _rng(cfg.seed, 4, job.split_code, block)
    imp = _impressions(world, cfg, block_sizes, rng)
    n = len(imp.item)
    p_ctr = _sigmoid(imp.logit_ctr + job.b_ctr)
    p_cvr = _sigmoid(imp.logit_cvr + job.b_cvr)
    click = (rng.random(n) < p_ctr).astype(np.int64)
    buy = click * (rng.random(n) < p_cvr)  # a conversion needs a click: never click=0, buy=1
    first_request = int(job.block_request_start[block])
    keys = _request_keys(cfg.seed, job.split_code, np.arange(first_request, first_request + len(block_sizes)))
    # skeleton: sample_id,click,buy,common_feature_index,feature_num,feature_list
    # Each line is the concatenation of string columns gathered from lookup tables (object fancy
    # indexing copies references only), joined once per row: no per-field Python work per row.
    first_sample = int(job.block_sample_start[block])
    sample_ids = np.arange(first_sample, first_sample + n, dtype=np.int64)
    feature_num = job.item_count[imp.item].copy()
    columns: list[np.ndarray | list[str]] = [
        list(map(str, sample_ids.tolist())),
        _LABEL_STR[click + buy],  # ",click,buy,"
        np.array([k + "," for k in keys], dtype=object)[imp.request_of_row],
        None,  # feature_num, filled below once all optional features are counted
        job.item_text[imp.item],
    ]
    for c in roles.combinations:
        hist_name = roles.combination_history[c.name]
        count = imp.match_count[hist_name]
        attr_first = world.item_attr[world.histories[hist_name].attr].first[imp.item]
        table = job.comb_tables[c.name]  # "\x01field\x02id\x03[1.0]" per local id, then "" (absent)
        present = count > 0  # a combination feature exists only where the user history matches
        local = attr_first * (len(COUNT_BUCKET_EDGES) + 1) + _count_bucket(count)
        columns.append(table[np.where(present, local, len(table) - 1)])
        if c.weighted:
            columns.append(_WEIGHT_STR[np.where(present, np.minimum(count, MAX_WEIGHT_COUNT), len(_WEIGHT_STR) - 1)])
        feature_num += present
    for name, table in job.ctx_tables.items():
        columns.append(table[imp.context[name]])
        feature_num += 1
    columns[3] = [f"{f}," for f in feature_num.tolist()]
    skeleton = ("\n".join(map("".join, zip(*columns))) + "\n").encode("ascii")
    # common features: common_feature_index,feature_num,feature_list (one line per request)
    common = "".join([
        f"{k},{job.user_count[u]},{job.user_text[u]}\n" for k, u in zip(keys, imp.request_user.tolist())
    ]).encode("ascii")
    seg = world.item_segment[imp.item]
    truth = {
        "sample_id": sample_ids,
        "item_id": world.id_offset[roles.item_id.name] + imp.item,
        "segment": seg,
        "p_ctr": p_ctr,
        "p_cvr": p_cvr,
    }
    return _Block(
        skeleton, common, truth, int(click.sum()), int(buy.sum()), float(p_ctr.sum()),
        np.bincount(seg, minlength=3), np.bincount(seg, weights=click, minlength=3),
        np.bincount(seg, weights=buy, minlength=3),
    )


def _write_split(
    world: _World, cfg: SynthConfig, split: str, rows: int, first_sample_id: int, b_ctr: float,
    b_cvr: float, texts: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], out: Path, workers: int,
) -> SplitSummary:
    """Write one split's skeleton, common features and ground truth; blocks render in ``workers``
    forked processes (in order, so the output does not depend on the worker count)."""
    global _JOB
    t0 = time.perf_counter()
    split_code = SPLITS.index(split) + 1
    roles = world.roles
    sizes = _request_sizes(cfg, rows, _rng(cfg.seed, 3, split_code))
    n_blocks = (len(sizes) + REQUESTS_PER_BLOCK - 1) // REQUESTS_PER_BLOCK
    block_starts = np.arange(n_blocks, dtype=np.int64) * REQUESTS_PER_BLOCK
    rows_before = np.concatenate([[0], np.cumsum(sizes)])[block_starts] if n_blocks else block_starts
    _JOB = _SplitJob(
        world=world, cfg=cfg, split_code=split_code, sizes=sizes, block_request_start=block_starts,
        block_sample_start=first_sample_id + rows_before, b_ctr=b_ctr, b_cvr=b_cvr,
        item_text=texts[0], item_count=texts[1], user_text=texts[2], user_count=texts[3],
        comb_tables={
            c.name: np.append("\x01" + _piece_table(world, c.name, "" if c.weighted else "1.0"), "")
            for c in roles.combinations
        },
        ctx_tables={s.name: "\x01" + _piece_table(world, s.name) for s in roles.contexts},
    )
    segment_dictionary = pa.array(SEGMENTS, pa.string())
    seg_rows, seg_clicks, seg_convs = np.zeros(3), np.zeros(3), np.zeros(3)
    clicks_total = conv_total = 0
    p_ctr_sum = 0.0
    pool = None
    try:
        if workers > 1 and n_blocks > 1:
            # fork: workers inherit the world (no pickling); blocks come back in order
            pool = multiprocessing.get_context("fork").Pool(min(workers, n_blocks))
            blocks = pool.imap(_render_block, range(n_blocks))
        else:
            blocks = map(_render_block, range(n_blocks))
        with open(out / f"sample_skeleton_{split}.csv", "wb") as skel, open(
            out / f"common_features_{split}.csv", "wb"
        ) as common, pq.ParquetWriter(
            out / f"ground_truth_{split}.parquet", GROUND_TRUTH_SCHEMA, use_dictionary=["segment"]
        ) as truth:
            for blk in blocks:
                skel.write(blk.skeleton)
                common.write(blk.common)
                t = blk.truth
                truth.write_table(pa.table({
                    "sample_id": pa.array(t["sample_id"], pa.int64()),
                    "item_id": pa.array(t["item_id"], pa.int64()),
                    "segment": pa.DictionaryArray.from_arrays(pa.array(t["segment"], pa.int8()), segment_dictionary),
                    "p_ctr": pa.array(t["p_ctr"], pa.float64()),
                    "p_cvr": pa.array(t["p_cvr"], pa.float64()),
                }, schema=GROUND_TRUTH_SCHEMA))
                seg_rows += blk.segment_rows
                seg_clicks += blk.segment_clicks
                seg_convs += blk.segment_conversions
                clicks_total += blk.clicks
                conv_total += blk.conversions
                p_ctr_sum += blk.p_ctr_sum
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        _JOB = None
    rates = {
        SEGMENTS[s]: {
            "rows": int(seg_rows[s]),
            "ctr": float(seg_clicks[s] / seg_rows[s]) if seg_rows[s] else float("nan"),
            "cvr": float(seg_convs[s] / seg_clicks[s]) if seg_clicks[s] else float("nan"),
        }
        for s in range(3)
    }
    return SplitSummary(rows, len(sizes), clicks_total, conv_total, p_ctr_sum / max(rows, 1),
                        time.perf_counter() - t0, rates)


def generate(
    cfg: SynthConfig, out_dir: str | Path, schema: FieldSchema | None = None, workers: int = 1
) -> dict[str, Any]:
    """Write both splits, the ground truth and ``synth_config.json`` into ``out_dir``.

    ``workers`` > 1 renders blocks in forked processes; the files are byte-identical either way.

    Returns the content of ``synth_config.json`` (config + derived intercepts + per-split summary).
    """
    for name in ("rows_train", "rows_test"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"synth: --{name.replace('_', '-')} must be >= 0")
    for name in ("clickbait_share", "gem_share"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"synth: --{name.replace('_', '-')} must be in [0, 1]")
    if not (math.isfinite(cfg.selection_strength) and cfg.selection_strength >= 0.0):
        raise ValueError(f"synth: --selection-strength must be a finite number >= 0, got {cfg.selection_strength}")
    if cfg.clickbait_share + cfg.gem_share > 1.0:
        raise ValueError("synth: --clickbait-share + --gem-share must be <= 1")
    schema = schema or load_schema(cfg.schema)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = _build_world(cfg, schema)
    b_ctr, b_cvr = _calibrate(world, cfg)
    texts = (*_item_strings(world, schema), *_user_strings(world, schema))
    setup_s = time.perf_counter() - t0
    summaries = {}
    first_id = 1  # sample ids are unique across splits: train 1..N, test N+1..N+M
    for split, rows in (("train", cfg.rows_train), ("test", cfg.rows_test)):
        summaries[split] = asdict(_write_split(
            world, cfg, split, rows, first_id, b_ctr, b_cvr, texts, out, workers))
        first_id += rows
    report = asdict(cfg)
    report["derived"] = {
        "intercept_ctr": b_ctr,
        "intercept_cvr": b_cvr,
        "cardinality": world.cardinality,
        "feature_id_offset": world.id_offset,
        "history_item_attribute": world.roles.history_attr,
        "combination_history": world.roles.combination_history,
        "segment_items": {s: int((world.item_segment == k).sum()) for k, s in enumerate(SEGMENTS)},
        "setup_seconds": setup_s,
        "splits": summaries,
    }
    with open(out / "synth_config.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False)
    return report


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthConfig()
    parser.add_argument("--out", required=True, help="output folder for the raw files")
    parser.add_argument("--rows-train", type=int, default=d.rows_train)
    parser.add_argument("--rows-test", type=int, default=d.rows_test)
    parser.add_argument("--users", type=int, default=d.users)
    parser.add_argument("--items", type=int, default=d.items)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--ctr", type=float, default=d.ctr, help="mean pCTR (default %(default)s)")
    parser.add_argument("--cvr", type=float, default=d.cvr, help="mean pCVR over clicks (default %(default)s)")
    parser.add_argument("--clickbait-share", type=float, default=d.clickbait_share)
    parser.add_argument("--gem-share", type=float, default=d.gem_share)
    parser.add_argument("--segment-ctr-shift", type=float, default=d.segment_ctr_shift)
    parser.add_argument("--segment-cvr-shift", type=float, default=d.segment_cvr_shift)
    parser.add_argument("--selection-strength", type=float, default=d.selection_strength,
                        help="scale of the click logit's features: 0 = clicks at random (no selection "
                        "bias), >1 = more selective (default %(default)s)")
    parser.add_argument("--mean-request-size", type=float, default=d.mean_request_size)
    parser.add_argument("--history-length", type=float, default=d.history_length)
    parser.add_argument("--schema", default=d.schema, help="field schema: packaged name or YAML path (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="forked processes rendering blocks; output is byte-identical for any count. "
                        "One process already writes >300k rows/s; more only pay off on idle cores")


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    """The :class:`SynthConfig` of parsed :func:`add_arguments` flags."""
    return SynthConfig(
        rows_train=args.rows_train, rows_test=args.rows_test, users=args.users, items=args.items,
        seed=args.seed, ctr=args.ctr, cvr=args.cvr, clickbait_share=args.clickbait_share,
        gem_share=args.gem_share, segment_ctr_shift=args.segment_ctr_shift,
        segment_cvr_shift=args.segment_cvr_shift, selection_strength=args.selection_strength,
        mean_request_size=args.mean_request_size,
        history_length=args.history_length, schema=args.schema,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    report = generate(cfg, args.out, workers=args.workers)
    wall = time.perf_counter() - t0
    total = cfg.rows_train + cfg.rows_test
    for split, s in report["derived"]["splits"].items():
        seg = ", ".join(f"{k}: ctr {v['ctr']:.4f} cvr {v['cvr']:.4f}" for k, v in s["segment_rates"].items())
        print(f"{split}: {s['rows']} rows, {s['requests']} requests, {s['clicks']} clicks "
              f"(CTR {s['clicks'] / max(s['rows'], 1):.4f}), {s['conversions']} conversions "
              f"(CVR {s['conversions'] / max(s['clicks'], 1):.4f}); {seg}")
    print(f"wrote {args.out} in {wall:.1f}s ({total / max(wall, 1e-9):,.0f} rows/s incl. set-up)")
    return 0
