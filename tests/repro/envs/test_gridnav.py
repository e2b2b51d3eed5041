"""The grid-navigation world: maps, shortest paths against a plain BFS, optimal actions, views and rollouts.

Legend: M maps, C categories, P cells, B episodes.
"""
from collections import deque

import numpy as np
import pytest
import torch

from moekit.repro.envs.gridnav import (CATEGORIES, DIRECTIONS, NUM_ACTIONS, STOP, UNREACHABLE, VIEWS, GridMap, NavWorld,
                                 allowed_moves, generate_map, geodesic_distance, in_sight_oracle, make_world,
                                 random_walk_policy)


def _bfs_reference(free, sources):
    """Plain queue BFS over the 8 moves, no corner cutting (the slow reference)."""
    H, W = free.shape
    dist = np.full((H, W), UNREACHABLE, dtype=np.int64)
    q = deque()
    for y, x in zip(*np.nonzero(sources & free)):
        dist[y, x] = 0
        q.append((y, x))
    while q:
        y, x = q.popleft()
        for dy, dx in DIRECTIONS:
            ny, nx = y + dy, x + dx
            if not (0 <= ny < H and 0 <= nx < W) or not free[ny, nx]:
                continue
            if dy and dx and not (free[y + dy, x] and free[y, x + dx]):
                continue
            if dist[ny, nx] == UNREACHABLE:
                dist[ny, nx] = dist[y, x] + 1
                q.append((ny, nx))
    return dist


def _toy_map():
    """16×16: a 6×6 room (rows/cols 2..7), a corridor east along row 4 to col 13, one chair at (3, 3)."""
    free = np.zeros((16, 16), dtype=bool)
    free[2:8, 2:8] = True
    free[4, 8:14] = True
    objects = np.full((16, 16), -1, dtype=np.int8)
    objects[3, 3] = 0
    objects[6, 6] = 1
    objects[5, 3] = 2
    objects[6, 3] = 3
    free[objects >= 0] = False
    corridor = np.zeros_like(free)
    corridor[4, 8:14] = True
    appearance = np.where(free, 0.0, 0.5).astype(np.float32)
    return GridMap(free=free, objects=objects, corridor=corridor, appearance=appearance)


def test_no_corner_cutting():
    free = np.array([[1, 0], [0, 1]], dtype=bool)
    assert not allowed_moves(free)[0, 0, 3]  # SE from (0,0) would cut both corners
    free = np.array([[1, 1], [0, 1]], dtype=bool)
    assert not allowed_moves(free)[0, 0, 3]  # one blocked orthogonal cell is enough to forbid it
    free = np.ones((2, 2), dtype=bool)
    assert allowed_moves(free)[0, 0, 3] and not allowed_moves(free)[0, 0, 0]  # north leaves the grid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_geodesic_distance_matches_plain_bfs(seed):
    rng = np.random.default_rng(seed)
    m = generate_map(rng, size=24)
    for c in range(len(CATEGORIES)):
        src = np.zeros_like(m.free)
        src[tuple(np.argwhere(m.objects == c)[0] + [0, 1])] = True  # some cell next to the furniture
        np.testing.assert_array_equal(geodesic_distance(m.free, src), _bfs_reference(m.free, src))


def test_generated_maps_are_connected_and_hold_every_category():
    rng = np.random.default_rng(5)
    for _ in range(5):
        m = generate_map(rng, size=28)
        assert set(np.unique(m.objects[m.objects >= 0]).tolist()) == set(range(len(CATEGORIES)))
        assert not m.free[m.objects >= 0].any()
        start = np.zeros_like(m.free)
        start[tuple(np.argwhere(m.free)[0])] = True
        assert (geodesic_distance(m.free, start)[m.free] < UNREACHABLE).all()
        assert m.corridor.any() and (m.free & ~m.corridor).sum() > m.corridor.sum()
        assert not m.free[0].any() and not m.free[:, 0].any()  # a wall around the map
    a, b = generate_map(np.random.default_rng(3)), generate_map(np.random.default_rng(3))
    np.testing.assert_array_equal(a.free, b.free)
    with pytest.raises(ValueError, match="size"):
        generate_map(rng, size=8)


def test_optimal_actions_follow_the_shortest_path():
    w = make_world(3, seed=11, size=24)
    m, c, p = w.states()
    d = w.dist_MCP[m, c, p]
    opt = w.optimal_MCPA[m, c, p]
    assert opt.any(-1).all()  # every reachable state has an optimal action
    assert torch.equal(opt[:, STOP], d == 0)
    # every optimal move lowers D by exactly one; every other move does not
    for a in range(8):
        d_next = w.dist_MCP[m, c, w.next_MPA[m, p, a]]
        assert torch.equal(opt[:, a], (d > 0) & (d_next == d - 1))
    # greedy descent reaches the goal in exactly D steps
    pos = p.clone()
    for _ in range(int(d.max())):
        a = w.optimal_MCPA[m, c, pos].float().argmax(-1)
        pos = torch.where(w.dist_MCP[m, c, pos] > 0, w.next_MPA[m, pos, a], pos)
    assert (w.dist_MCP[m, c, pos] == 0).all()


def test_blocked_moves_stay_and_stop_stays():
    w = NavWorld([_toy_map()])
    cell = 2 * 16 + 2  # top-left room corner
    nxt = w.next_MPA[0, cell]
    assert nxt[0] == cell and nxt[7] == cell and nxt[6] == cell  # N, NW, W blocked
    assert nxt[2] == cell + 1 and nxt[4] == cell + 16 and nxt[STOP] == cell


def test_views_on_a_hand_made_map():
    w = NavWorld([_toy_map()])
    assert w.view_dims == [16, 24, 24, 16, 3]
    cell = torch.tensor([4 * 16 + 8])  # corridor entrance, row 4 col 8
    m0, c0 = torch.tensor([0]), torch.tensor([0])
    views = w.observe(m0, c0, cell, noise=False)
    assert [v.shape[-1] for v in views] == w.view_dims
    depth = views[0][0, :8] * w.depth_range
    # east: cols 9..13 are floor -> 5 steps; west: cols 7..2 -> 6 steps; north / south: walls
    assert depth.tolist()[2] == 5 and depth.tolist()[6] == 6 and depth[0] == 0 and depth[4] == 0
    sem = views[2][0]
    # the chair at (3, 3) is to the west-north-west: seen in the W sector (index 6), not in the E sector
    assert sem[6] > 0 and sem[2] == 0
    assert sem[16 + 2] == 1 and sem[16 + 0] == 0  # floor label: east is floor, north is not
    goal = w.goal(m0, c0, cell, noise=False)
    assert goal[0, :len(CATEGORIES)].tolist() == [1, 0, 0, 0]
    # compass to (3, 3) from (4, 8): dx = -5, dy(up) = +1
    torch.testing.assert_close(goal[0, 4:], torch.tensor([-5.0, 1.0]) / np.hypot(5, 1), rtol=1e-5, atol=1e-6)
    # in sight from the corridor entrance; from the corridor's end (4, 13) the chair is 10.05 cells away: out of range
    assert w.target_in_sight(m0, c0, cell).tolist() == [True]
    assert w.target_in_sight(m0, c0, torch.tensor([4 * 16 + 13])).tolist() == [False]
    layout = views[1][0].reshape(-1)
    assert layout.sum() > 0 and layout.max() == 1


def test_observe_noise_is_seeded():
    w = make_world(2, seed=4, size=20)
    m, c, p = w.sample_episodes(16, torch.Generator().manual_seed(0))
    a = w.observe(m, c, p, torch.Generator().manual_seed(1))
    b = w.observe(m, c, p, torch.Generator().manual_seed(1))
    clean = w.observe(m, c, p, noise=False)
    for x, y, z in zip(a, b, clean):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], clean[0])


def test_rollout_expert_random_and_stop():
    w = make_world(3, seed=21, size=24)
    m, c, p = w.sample_episodes(128, torch.Generator().manual_seed(0))
    assert (w.dist_MCP[m, c, p] >= 6).all() and (w.dist_MCP[m, c, p] <= 32).all()

    def expert(views, goal, state):
        opt = w.optimal_MCPA[state].float()
        return opt / opt.sum(-1, keepdim=True)

    out = w.rollout(expert, m, c, p, torch.Generator().manual_seed(1))
    assert out["success_B"].all()
    # the expert is within 3 steps after D - 3 moves
    assert torch.equal(out["steps_B"], w.dist_MCP[m, c, p] - 3)
    rw = w.rollout(random_walk_policy, m, c, p, torch.Generator().manual_seed(1))
    assert rw["success_B"].float().mean() < 0.5
    assert rw["trace_cell_TB"].shape[1] == 128
    # the in-sight oracle: optimal while the target is in sight, a random walk otherwise -> in between
    ins = w.rollout(in_sight_oracle(w), m, c, p, torch.Generator().manual_seed(1))
    assert rw["success_B"].float().mean() <= ins["success_B"].float().mean() < 1.0

    def stop(views, goal, state):
        return torch.nn.functional.one_hot(torch.full((goal.shape[0],), STOP), NUM_ACTIONS).float()

    out = w.rollout(stop, m, c, p, torch.Generator().manual_seed(1))
    assert not out["success_B"].any() and (out["steps_B"] == 1).all()


def test_views_registry_and_errors():
    assert len(VIEWS) == 5
    with pytest.raises(ValueError, match="maps"):
        NavWorld([])
    w = NavWorld([_toy_map()])
    with pytest.raises(ValueError, match="min_dist"):
        w.sample_episodes(4, min_dist=100, max_dist=200)
