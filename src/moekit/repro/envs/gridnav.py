"""Procedural indoor navigation on an 8-neighbour grid: a small stand-in for the Gibson setup of
Shen et al. (ICCV 2019), "Situational fusion of visual representation for visual navigation".

Legend: M maps, H×W grid, P = H·W cells (flat index ``y·W + x``), C object categories, A = 9 actions
(8 moves + stop), B episodes / states in a batch, F a view's feature size, O visible offsets, S = 8 sectors.

A map is made of rectangular rooms joined by one-cell-wide corridors; furniture of ``C`` categories stands
inside the rooms (furniture cells are obstacles). An episode is a start cell and a target category: the
goal cells are the floor cells next to any piece of furniture of that category, ``D`` is the geodesic
(shortest-path) step count to the nearest goal cell. Moves are the 8 neighbours; a diagonal move may not
cut a corner (both orthogonal cells must be floor); a blocked move leaves the agent in place. An episode
succeeds when the agent comes within ``success_radius`` steps of a goal (``D ≤ 3``) within ``max_steps``
(39) steps; the *stop* action ends it. The shortest path supervises the policies: the optimal actions of a
state are the moves that decrease ``D`` by one (and *stop* at ``D = 0``).

The agent sees its surroundings through several **views**, each a different derived representation of the
same panorama (line of sight up to ``view_radius`` cells, binned into 8 sectors around the 8 directions):

* ``depth``     (3D)       free-space ray length in each of the 8 directions (+ Gaussian noise), and per sector
                           the closeness of the nearest visible furniture of any category (shapes, no classes);
* ``layout``    (3D)       occupancy of the 5×5 neighbourhood (surface layout; redundant with ``depth``);
* ``semantic``  (semantic) per sector, closeness of the nearest visible furniture of the target category and
                           of any furniture (a detector that misses 10 % of detections), and whether the next
                           cell in each direction is floor (a coarse floor label, 20 % of them flipped);
* ``texture``   (2D)       per sector, mean appearance of the visible obstacle surfaces and the density of
                           edges (floor/obstacle boundaries); wall appearance is drawn per map (a nuisance
                           a policy can overfit to), furniture appearance per category (a weak semantic cue);
* ``vanishing`` (low-level) the axis of the longest free line of sight as a noisy doubled-angle unit vector
                           (a vanishing-point-like cue; 20 % of the time a random axis) and its length.

The **goal** given to every policy (``goal``) is the target category (one-hot) and a noisy compass to the
nearest furniture of that category, straight through walls (unit vector; 30° Gaussian angle noise, 20 % of
the time a random direction). Without any goal direction a memoryless agent finds a target in another room
only by chance (the ``in-sight oracle`` row of ``moekit run situational-fusion`` measures it: a policy that
acts optimally whenever the target is in sight and walks at random otherwise).

Everything that does not depend on noise is tabulated once per map and cell, so a batch of observations
is a gather plus noise; episodes run in lock-step batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

DIRECTIONS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))  # N NE E SE S SW W NW
STOP = 8
NUM_ACTIONS = 9
CATEGORIES = ("chair", "table", "bed", "sofa")
VIEWS = ("depth", "layout", "semantic", "texture", "vanishing")
VIEW_FAMILY = {"depth": "3D", "layout": "3D", "semantic": "semantic", "texture": "2D", "vanishing": "low-level"}
UNREACHABLE = 10_000


# --------------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------------

@dataclass
class GridMap:
    """One generated map (numpy arrays, all (H, W))."""
    free: np.ndarray        # bool: floor the agent can stand on
    objects: np.ndarray     # int8: furniture category at the cell, -1 where none
    corridor: np.ndarray    # bool: floor carved as a corridor (not part of a room)
    appearance: np.ndarray  # float32 in [0, 1]: how an obstacle cell looks (walls per map, furniture per category)


def allowed_moves(free_HW: np.ndarray) -> np.ndarray:
    """``(H, W, 8)`` bool: the move in direction ``a`` from a floor cell lands on floor without cutting a corner."""
    H, W = free_HW.shape
    pad = np.zeros((H + 2, W + 2), dtype=bool)
    pad[1:-1, 1:-1] = free_HW
    out = np.zeros((H, W, 8), dtype=bool)
    for a, (dy, dx) in enumerate(DIRECTIONS):
        ok = free_HW & pad[1 + dy:H + 1 + dy, 1 + dx:W + 1 + dx]
        if dy and dx:
            ok &= pad[1 + dy:H + 1 + dy, 1:W + 1] & pad[1:H + 1, 1 + dx:W + 1 + dx]
        out[..., a] = ok
    return out


def geodesic_distance(free_HW: np.ndarray, sources_HW: np.ndarray) -> np.ndarray:
    """Steps from every floor cell to the nearest source cell over the allowed moves (breadth-first, all
    cells at once); ``UNREACHABLE`` where no path exists or the cell is not floor."""
    H, W = free_HW.shape
    allowed_HWA = allowed_moves(free_HW)
    dist = np.full((H, W), UNREACHABLE, dtype=np.int64)
    frontier = sources_HW & free_HW
    dist[frontier] = 0
    d = 0
    while frontier.any():
        d += 1
        pad = np.zeros((H + 2, W + 2), dtype=bool)
        pad[1:-1, 1:-1] = frontier
        reach = np.zeros((H, W), dtype=bool)
        for a, (dy, dx) in enumerate(DIRECTIONS):  # moves are symmetric: c reaches the frontier in one move
            reach |= allowed_HWA[..., a] & pad[1 + dy:H + 1 + dy, 1 + dx:W + 1 + dx]
        frontier = reach & (dist == UNREACHABLE)
        dist[frontier] = d
    return dist


def _connected(free_HW: np.ndarray) -> bool:
    start = np.zeros_like(free_HW)
    ys, xs = np.nonzero(free_HW)
    start[ys[0], xs[0]] = True
    return bool((geodesic_distance(free_HW, start)[free_HW] < UNREACHABLE).all())


def generate_map(rng: np.random.Generator, size: int = 28, max_rooms: int = 6, room_size: tuple[int, int] = (4, 9),
                 num_categories: int = len(CATEGORIES)) -> GridMap:
    """Rooms (rectangles of ``room_size`` cells a side) joined in a random chain (plus one loop) by
    one-cell-wide L-shaped corridors; 1–3 pieces of furniture per room, every category at least once."""
    if size < 16:
        raise ValueError(f"size: must be >= 16, got {size}")
    for _ in range(100):
        free = np.zeros((size, size), dtype=bool)
        room_id = np.full((size, size), -1, dtype=np.int64)
        rooms: list[tuple[int, int, int, int]] = []
        for _ in range(80):
            h, w = (int(v) for v in rng.integers(room_size[0], room_size[1] + 1, size=2))
            y, x = int(rng.integers(1, size - h)), int(rng.integers(1, size - w))
            if (room_id[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] >= 0).any():
                continue
            room_id[y:y + h, x:x + w] = len(rooms)
            free[y:y + h, x:x + w] = True
            rooms.append((y, x, h, w))
            if len(rooms) == max_rooms:
                break
        if len(rooms) < 3:
            continue
        corridor = np.zeros_like(free)
        order = [int(i) for i in rng.permutation(len(rooms))]
        links = list(zip(order[:-1], order[1:]))
        if rng.random() < 0.5:
            i, j = rng.choice(len(rooms), size=2, replace=False)
            links.append((int(i), int(j)))
        for i, j in links:
            (y0, x0, h0, w0), (y1, x1, h1, w1) = rooms[i], rooms[j]
            ay, ax = int(rng.integers(y0 + 1, y0 + h0 - 1)), int(rng.integers(x0 + 1, x0 + w0 - 1))
            by, bx = int(rng.integers(y1 + 1, y1 + h1 - 1)), int(rng.integers(x1 + 1, x1 + w1 - 1))
            cells = ([(ay, x) for x in range(min(ax, bx), max(ax, bx) + 1)] + [(y, bx) for y in range(min(ay, by), max(ay, by) + 1)]
                     if rng.random() < 0.5 else
                     [(y, ax) for y in range(min(ay, by), max(ay, by) + 1)] + [(by, x) for x in range(min(ax, bx), max(ax, bx) + 1)])
            for cy, cx in cells:
                if not free[cy, cx]:
                    corridor[cy, cx] = True
                free[cy, cx] = True
        # furniture: room cells whose 8 neighbours are all cells of the same room (never in a doorway)
        objects = np.full((size, size), -1, dtype=np.int8)
        candidates: list[tuple[int, int]] = []
        for r, (y, x, h, w) in enumerate(rooms):
            cells = [(cy, cx) for cy in range(y + 1, y + h - 1) for cx in range(x + 1, x + w - 1)]
            k = int(rng.integers(1, 4))
            for idx in rng.permutation(len(cells))[:k]:
                candidates.append(cells[int(idx)])
        cats = list(rng.permutation(num_categories)) + list(rng.integers(0, num_categories, size=len(candidates)))
        placed = 0
        for cy, cx in candidates:
            free[cy, cx] = False
            if not _connected(free):
                free[cy, cx] = True
                continue
            objects[cy, cx] = int(cats[placed])
            placed += 1
        if len(set(objects[objects >= 0].tolist())) < num_categories:
            continue
        appearance = _appearance(rng, free, objects, num_categories)
        return GridMap(free=free, objects=objects, corridor=corridor & free, appearance=appearance)
    raise RuntimeError("generate_map: could not place the rooms; use a larger size or fewer rooms")


def _appearance(rng: np.random.Generator, free: np.ndarray, objects: np.ndarray, C: int) -> np.ndarray:
    """Walls: one of 3 per-map colours, chosen per 4×4 block; furniture: its category's colour ± 0.05."""
    H, W = free.shape
    palette = rng.random(3)
    block = rng.integers(0, 3, size=((H + 3) // 4, (W + 3) // 4))
    app = palette[block.repeat(4, 0).repeat(4, 1)[:H, :W]]
    cat_colour = (np.arange(C) + 0.5) / C
    obj = objects >= 0
    app[obj] = cat_colour[objects[obj]] + 0.05 * rng.standard_normal(int(obj.sum()))
    app[free] = 0.0
    return np.clip(app, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Static per-cell tables of the views
# --------------------------------------------------------------------------------------------------

def _visible_offsets(radius: int) -> tuple[np.ndarray, np.ndarray, list[list[tuple[int, int]]]]:
    """Offsets within ``radius`` (not the origin), their sector (nearest of the 8 directions) and the cells a
    line of sight passes on its way (sampled at half-cell steps, rounded, endpoints excluded)."""
    offs, lines = [], []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if (dy or dx) and dy * dy + dx * dx <= radius * radius:
                offs.append((dy, dx))
                n = 2 * max(abs(dy), abs(dx))
                cells = {(int(round(dy * i / n)), int(round(dx * i / n))) for i in range(1, n)}
                cells.discard((0, 0))
                cells.discard((dy, dx))
                lines.append(sorted(cells))
    off = np.array(offs)
    dirs = np.array(DIRECTIONS, dtype=float)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    sector = np.argmax((off / np.linalg.norm(off, axis=1, keepdims=True)) @ dirs.T, axis=1)
    return off, sector, lines


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``out[y, x] = a[y + dy, x + dx]`` (``fill`` outside the grid)."""
    H, W = a.shape[:2]
    out = np.full_like(a, fill)
    ys, yd = slice(max(dy, 0), H + min(dy, 0)), slice(max(-dy, 0), H + min(-dy, 0))
    xs, xd = slice(max(dx, 0), W + min(dx, 0)), slice(max(-dx, 0), W + min(-dx, 0))
    out[yd, xd] = a[ys, xs]
    return out


def static_views(m: GridMap, num_categories: int, view_radius: int = 10, depth_range: int = 8) -> dict[str, np.ndarray]:
    """Noise-free view tables of one map: ``depth (H,W,8)``, ``layout (H,W,24)``, ``semantic (C,H,W,16)``,
    ``texture (H,W,16)``, ``vanish_axis (H,W)`` (radians), ``vanish_len (H,W)``."""
    free = m.free
    H, W = free.shape
    allowed = allowed_moves(free)
    # depth: consecutive allowed moves along each direction, up to depth_range
    depth = np.zeros((H, W, 8), dtype=np.float32)
    for a, (dy, dx) in enumerate(DIRECTIONS):
        alive = free.copy()
        for k in range(1, depth_range + 1):
            step_ok = _shift(allowed[..., a], (k - 1) * dy, (k - 1) * dx, False)
            alive &= step_ok
            depth[..., a] += alive
    # layout: 5×5 occupancy around the cell (outside the grid counts as obstacle)
    layout = np.stack([~_shift(free, dy, dx, False) for dy in range(-2, 3) for dx in range(-2, 3) if dy or dx],
                      axis=-1).astype(np.float32)
    # line of sight: an offset is visible when every cell the line passes is floor
    off, sector, lines = _visible_offsets(view_radius)
    visible = np.zeros((H, W, len(off)), dtype=bool)
    for o, ((dy, dx), cells) in enumerate(zip(off, lines)):
        v = _shift(np.ones_like(free), int(dy), int(dx), False)  # inside the grid
        for cy, cx in cells:
            v &= _shift(free, cy, cx, False)
        visible[..., o] = v & free
    closeness = (1.0 - np.linalg.norm(off, axis=1) / (view_radius + 1)).astype(np.float32)  # (O,)
    obj_at = np.stack([_shift(m.objects.astype(np.int64), int(dy), int(dx), -1) for dy, dx in off], axis=-1)  # (H,W,O)
    app_at = np.stack([_shift(m.appearance, int(dy), int(dx), 0.0) for dy, dx in off], axis=-1)
    obst_at = np.stack([~_shift(free, int(dy), int(dx), False) for dy, dx in off], axis=-1)
    # an edge: an obstacle cell with a floor cell among its 4 neighbours
    edge_map = ~free & (_shift(free, 1, 0, False) | _shift(free, -1, 0, False) | _shift(free, 0, 1, False)
                        | _shift(free, 0, -1, False))
    edge_at = np.stack([_shift(edge_map, int(dy), int(dx), False) for dy, dx in off], axis=-1)
    semantic = np.zeros((num_categories, H, W, 24), dtype=np.float32)
    semantic[..., 16:] = allowed
    texture = np.zeros((H, W, 16), dtype=np.float32)
    for s in range(8):
        in_s = sector == s
        vis_s = visible[..., in_s]
        near_s = np.where(vis_s, closeness[in_s], 0.0)
        any_obj = np.where(obj_at[..., in_s] >= 0, near_s, 0.0).max(-1)
        for c in range(num_categories):
            semantic[c, ..., s] = np.where(obj_at[..., in_s] == c, near_s, 0.0).max(-1)
            semantic[c, ..., 8 + s] = any_obj
        seen_obst = vis_s & obst_at[..., in_s]
        n_obst = seen_obst.sum(-1)
        texture[..., s] = np.where(n_obst > 0, (app_at[..., in_s] * seen_obst).sum(-1) / np.maximum(n_obst, 1), 0.0)
        texture[..., 8 + s] = (vis_s & edge_at[..., in_s]).sum(-1) / in_s.sum() * 4.0
    axis = np.array([math.atan2(-dy, dx) for dy, dx in DIRECTIONS])
    longest = depth.argmax(-1)
    # heading: angle (counter-clockwise from east, y up) to the nearest piece of target furniture (Euclidean)
    yy, xx = np.mgrid[0:H, 0:W]
    heading = np.zeros((num_categories, H, W), dtype=np.float32)
    for c in range(num_categories):
        oy, ox = np.nonzero(m.objects == c)
        if len(oy):
            d2 = (yy[..., None] - oy) ** 2 + (xx[..., None] - ox) ** 2
            k = d2.argmin(-1)
            heading[c] = np.arctan2(-(oy[k] - yy), ox[k] - xx)
    return {"depth": depth, "layout": layout, "semantic": semantic, "texture": texture,
            "vanish_axis": axis[longest].astype(np.float32), "vanish_len": depth.max(-1), "heading": heading}


# --------------------------------------------------------------------------------------------------
# A batch of maps as tensors
# --------------------------------------------------------------------------------------------------

class NavWorld:
    """Maps stacked as tensors with their shortest-path tables and view tables.

    ``observe`` turns a batch of states ``(map_B, category_B, cell_B)`` into the list of view tensors (order
    ``VIEWS``); ``rollout`` runs a batch of episodes in lock-step.
    """

    def __init__(self, maps: Sequence[GridMap], num_categories: int = len(CATEGORIES), view_radius: int = 10,
                 depth_range: int = 8):
        if not maps:
            raise ValueError("maps: expected at least one GridMap")
        H, W = maps[0].free.shape
        if any(m.free.shape != (H, W) for m in maps):
            raise ValueError("maps: all maps must have the same size")
        self.maps = list(maps)
        self.H, self.W, self.C, self.M = H, W, num_categories, len(maps)
        self.depth_range = depth_range
        P = H * W
        dist, nxt, statics = [], [], []
        idx_HW = np.arange(P).reshape(H, W)
        for m in maps:
            goals = []
            for c in range(num_categories):
                obj = m.objects == c
                near = np.zeros_like(obj)
                for dy, dx in DIRECTIONS:
                    near |= _shift(obj, dy, dx, False)
                goals.append(geodesic_distance(m.free, near & m.free))
            dist.append(np.stack(goals).reshape(num_categories, P))
            allowed = allowed_moves(m.free)
            moves = np.stack([np.where(allowed[..., a], _shift(idx_HW, dy, dx, 0), idx_HW)
                              for a, (dy, dx) in enumerate(DIRECTIONS)] + [idx_HW], axis=-1)
            nxt.append(moves.reshape(P, NUM_ACTIONS))
            statics.append(static_views(m, num_categories, view_radius, depth_range))
        self.dist_MCP = torch.as_tensor(np.stack(dist))
        self.next_MPA = torch.as_tensor(np.stack(nxt))
        self.free_MP = torch.as_tensor(np.stack([m.free.reshape(P) for m in maps]))
        self.corridor_MP = torch.as_tensor(np.stack([m.corridor.reshape(P) for m in maps]))
        depth = np.stack([s["depth"] for s in statics])  # (M,H,W,8)
        # clearance: 1 + the shortest of the 8 free-space rays (1 = an obstacle next to the cell)
        self.clearance_MP = torch.as_tensor(depth.min(-1).reshape(self.M, P)).long() + 1
        self._depth = torch.as_tensor(depth.reshape(self.M, P, 8)) / depth_range
        self._layout = torch.as_tensor(np.stack([s["layout"] for s in statics]).reshape(self.M, P, -1))
        self._semantic = torch.as_tensor(np.stack([s["semantic"] for s in statics]).reshape(self.M, num_categories, P, -1))
        self._texture = torch.as_tensor(np.stack([s["texture"] for s in statics]).reshape(self.M, P, -1))
        self._vanish_axis = torch.as_tensor(np.stack([s["vanish_axis"] for s in statics]).reshape(self.M, P))
        self._vanish_len = torch.as_tensor(np.stack([s["vanish_len"] for s in statics]).reshape(self.M, P)) / depth_range
        self._heading = torch.as_tensor(np.stack([s["heading"] for s in statics]).reshape(self.M, num_categories, P))
        # optimal actions: moves that bring D down by one; stop at the goal
        d_MCP = self.dist_MCP
        d_next = torch.stack([torch.gather(d_MCP, 2, self.next_MPA[:, None, :, a].expand_as(d_MCP))
                              for a in range(8)], dim=-1)  # (M,C,P,8)
        reach = d_MCP < UNREACHABLE
        opt_moves = (d_next == (d_MCP - 1)[..., None]) & reach[..., None] & (d_MCP > 0)[..., None]
        self.optimal_MCPA = torch.cat([opt_moves, ((d_MCP == 0) & reach)[..., None]], dim=-1)

    @property
    def view_dims(self) -> list[int]:
        return [16, self._layout.shape[-1], self._semantic.shape[-1], self._texture.shape[-1], 3]

    @property
    def goal_dim(self) -> int:
        return self.C + 2

    def observe(self, map_B: Tensor, category_B: Tensor, cell_B: Tensor, generator: torch.Generator | None = None,
                noise: bool = True) -> list[Tensor]:
        """The views of a batch of states, in the order of ``VIEWS`` (each (B, F_i), float32)."""
        B = map_B.shape[0]
        depth = self._depth[map_B, cell_B]
        layout = self._layout[map_B, cell_B]
        semantic = self._semantic[map_B, category_B, cell_B]
        shapes = semantic[:, 8:16]
        texture = self._texture[map_B, cell_B]
        axis = self._vanish_axis[map_B, cell_B]
        if noise:
            depth = depth + 0.05 * torch.randn(depth.shape, generator=generator)
            keep = torch.rand((B, 16), generator=generator) >= 0.1
            flip = (torch.rand((B, 8), generator=generator) < 0.2).float()
            semantic = torch.cat([semantic[:, :16] * keep, semantic[:, 16:] + flip - 2 * flip * semantic[:, 16:]], -1)
            texture = texture + 0.05 * torch.randn(texture.shape, generator=generator)
            axis = axis + math.radians(20.0) * torch.randn(B, generator=generator)
            scramble = torch.rand(B, generator=generator) < 0.2
            axis = torch.where(scramble, math.pi * torch.rand(B, generator=generator), axis)
        vanishing = torch.stack([torch.cos(2 * axis), torch.sin(2 * axis), self._vanish_len[map_B, cell_B]], dim=-1)
        return [torch.cat([depth, shapes], -1), layout, semantic, texture, vanishing]

    def goal(self, map_B: Tensor, category_B: Tensor, cell_B: Tensor, generator: torch.Generator | None = None,
             noise: bool = True) -> Tensor:
        """The goal every policy is given, (B, C + 2): target category one-hot and the noisy compass (cos, sin)."""
        B = map_B.shape[0]
        heading = self._heading[map_B, category_B, cell_B]
        if noise:
            heading = heading + math.radians(30.0) * torch.randn(B, generator=generator)
            scramble = torch.rand(B, generator=generator) < 0.2
            heading = torch.where(scramble, 2 * math.pi * torch.rand(B, generator=generator), heading)
        onehot = torch.nn.functional.one_hot(category_B, self.C).float()
        return torch.cat([onehot, torch.cos(heading)[:, None], torch.sin(heading)[:, None]], -1)

    def target_in_sight(self, map_B: Tensor, category_B: Tensor, cell_B: Tensor) -> Tensor:
        """(B,) bool: furniture of the target category is in line of sight (within ``view_radius``)."""
        return self._semantic[map_B, category_B, cell_B][:, :8].amax(-1) > 0

    def states(self, max_dist: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Every (map, category, cell) whose cell is floor with a path to the category (``D ≤ max_dist`` if given)."""
        ok = (self.dist_MCP < UNREACHABLE) & self.free_MP[:, None, :]
        if max_dist is not None:
            ok &= self.dist_MCP <= max_dist
        m, c, p = ok.nonzero(as_tuple=True)
        return m, c, p

    def sample_episodes(self, n: int, generator: torch.Generator | None = None, min_dist: int = 6,
                        max_dist: int = 32) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` random episodes: start cell and target category with ``min_dist ≤ D ≤ max_dist``."""
        ok = (self.dist_MCP >= min_dist) & (self.dist_MCP <= max_dist) & self.free_MP[:, None, :]
        m, c, p = ok.nonzero(as_tuple=True)
        if m.numel() == 0:
            raise ValueError(f"min_dist/max_dist: no start at distance {min_dist}..{max_dist} on these maps")
        pick = torch.randint(m.numel(), (n,), generator=generator)
        return m[pick], c[pick], p[pick]

    def rollout(self, policy: Callable[[list[Tensor], Tensor], Tensor], map_B: Tensor, category_B: Tensor,
                cell_B: Tensor, generator: torch.Generator | None = None, max_steps: int = 39,
                success_radius: int = 3, greedy: bool = False, transform: Callable[[list[Tensor]], list[Tensor]] | None = None
                ) -> dict[str, Tensor]:
        """Run the episodes in lock-step. ``policy(views, goal_B, state) -> action probabilities (B, A)`` with
        ``state = (map_B, category_B, cell_B)`` (learned policies ignore it; oracles read it);
        actions are sampled (``greedy``: argmax). ``transform`` edits the views before the policy sees them
        (e.g. drop one). Returns ``success_B`` (bool), ``steps_B`` and the visited states ``trace_*`` (T, B)."""
        B = map_B.shape[0]
        pos = cell_B.clone()
        done = torch.zeros(B, dtype=torch.bool)
        success = torch.zeros(B, dtype=torch.bool)
        steps = torch.zeros(B, dtype=torch.long)
        trace = []
        for _ in range(max_steps):
            views = self.observe(map_B, category_B, pos, generator)
            if transform is not None:
                views = transform(views)
            probs = policy(views, self.goal(map_B, category_B, pos, generator), (map_B, category_B, pos))
            action = probs.argmax(-1) if greedy else torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            trace.append((pos.clone(), done.clone()))
            new_pos = self.next_MPA[map_B, pos, action]
            pos = torch.where(done, pos, new_pos)
            steps = steps + (~done).long()
            d = self.dist_MCP[map_B, category_B, pos]
            success |= ~done & (d <= success_radius)
            done |= (action == STOP) | success
            if bool(done.all()):
                break
        return {"success_B": success, "steps_B": steps,
                "trace_cell_TB": torch.stack([t[0] for t in trace]), "trace_done_TB": torch.stack([t[1] for t in trace])}


def random_walk_policy(views: list[Tensor], goal_B: Tensor, state: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Uniform over the 8 moves (never stops)."""
    B = goal_B.shape[0]
    probs = torch.full((B, NUM_ACTIONS), 1.0 / 8)
    probs[:, STOP] = 0.0
    return probs


def in_sight_oracle(world: NavWorld) -> Callable[[list[Tensor], Tensor, tuple[Tensor, Tensor, Tensor]], Tensor]:
    """A reference policy: the shortest-path actions (uniformly) while furniture of the target category is in
    line of sight, a random walk otherwise — the best a memoryless agent without a goal direction can be sure of."""

    def policy(views: list[Tensor], goal_B: Tensor, state: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        m, c, p = state
        opt = world.optimal_MCPA[m, c, p].float()
        in_sight = world.target_in_sight(m, c, p)
        return torch.where(in_sight[:, None], opt / opt.sum(-1, keepdim=True), random_walk_policy(views, goal_B))
    return policy


def make_world(num_maps: int, seed: int, size: int = 28, **kwargs) -> NavWorld:
    """``num_maps`` maps drawn from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return NavWorld([generate_map(rng, size) for _ in range(num_maps)], **kwargs)


__all__ = ["CATEGORIES", "DIRECTIONS", "GridMap", "NUM_ACTIONS", "NavWorld", "STOP", "UNREACHABLE", "VIEWS",
           "VIEW_FAMILY", "allowed_moves", "generate_map", "geodesic_distance", "in_sight_oracle", "make_world",
           "random_walk_policy",
           "static_views"]
