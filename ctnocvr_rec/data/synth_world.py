"""The world behind ``ctnocvr data synth``: users, items, requests and their true click/buy odds.

This module draws; :mod:`ctnocvr_rec.data.synth` renders the draws as raw Ali-CCP lines and knows the
file format, which this module never sees. Here each schema field gets a role
(:func:`_field_roles`), users and items get their latent effects (:func:`build_world`), a block of
requests gets its candidate impressions with their click and conversion logits
(:func:`draw_impressions`), and the intercepts are solved so that the realised rates hit the
configured ones (:func:`calibrate`).

The generative model (all effects on the logit scale; fields come from the schema):

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

Randomness comes only from :func:`seeded_rng` streams keyed by ``(seed, purpose, ...)``: 1 builds the
world, 2 calibrates, 3 draws a split's request sizes, 4 a block's impressions and labels. Each piece
is therefore reproducible on its own, in whichever worker process renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ctnocvr_rec.data.schema import FieldSchema, FieldSpec

if TYPE_CHECKING:  # the config lives with the public entry point, which imports this module
    from ctnocvr_rec.data.synth import SynthConfig

SEGMENTS = ("normal", "clickbait", "gem")
SEGMENT_NORMAL, SEGMENT_CLICKBAIT, SEGMENT_GEM = 0, 1, 2
#: Ali-CCP's documented pairing of the 14-day user histories with item attributes, and of the
#: combination fields with the histories; other schemas pair by position (see _field_roles)
KNOWN_HISTORY_ATTR = {"109_14": "206", "110_14": "207", "127_14": "216", "150_14": "210"}
KNOWN_COMBINATION_HISTORY = {"508": "109_14", "509": "110_14", "702": "127_14", "853": "150_14"}
#: cardinalities of user attribute fields (after the user id), cycled in schema order
USER_ATTR_CARDINALITIES = (97, 3, 7, 12, 5, 4, 4, 3, 6)
#: combination ids encode (attribute value, count bucket); buckets: count 1 | 2-3 | >=4
COUNT_BUCKET_EDGES = np.array([2, 4])


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
class World:
    """Users and items of one generated data set with their latent effects, read-only once built
    (forked renderers share it). Item arrays are ``[I]``, user arrays ``[U]``; field values are local
    ids ``0 .. cardinality - 1``, written as raw feature id ``id_offset[field] + value``."""

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


def seeded_rng(seed: int, *stream: int) -> np.random.Generator:
    """The generator of one purpose's stream (see the module docstring for the stream numbers)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def build_world(cfg: SynthConfig, schema: FieldSchema) -> World:
    """Draw the users and items of ``cfg`` for the fields of ``schema`` (stream 1)."""
    roles = _field_roles(schema)
    rng = seeded_rng(cfg.seed, 1)
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
    return World(
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


def draw_impressions(world: World, cfg: SynthConfig, sizes: np.ndarray, rng: np.random.Generator) -> _Impressions:
    """Impressions of ``len(sizes)`` requests, ``sizes[r]`` candidates each: users by activity, items
    from the user's preferred categories (share ``preferred_candidate_share``) or by popularity, and
    their click / conversion logits without the intercepts."""
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


def sigmoid(x: np.ndarray) -> np.ndarray:
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


def calibrate(world: World, cfg: SynthConfig) -> tuple[float, float]:
    """Intercepts giving mean pCTR = cfg.ctr and click-weighted mean pCVR = cfg.cvr."""
    for name, rate in (("ctr", cfg.ctr), ("cvr", cfg.cvr)):
        if not 0.0 < rate < 1.0:
            raise ValueError(f"synth: --{name} must be in (0, 1), got {rate}")
    rng = seeded_rng(cfg.seed, 2)
    sizes = request_sizes(cfg, 100_000, rng)
    imp = draw_impressions(world, cfg, sizes, rng)
    b_ctr = _solve_intercept(cfg.ctr, lambda b: float(sigmoid(imp.logit_ctr + b).mean()))
    p_ctr = sigmoid(imp.logit_ctr + b_ctr)
    b_cvr = _solve_intercept(
        cfg.cvr, lambda b: float((p_ctr * sigmoid(imp.logit_cvr + b)).sum() / p_ctr.sum()))
    return b_ctr, b_cvr


def request_sizes(cfg: SynthConfig, rows: int, rng: np.random.Generator) -> np.ndarray:
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
