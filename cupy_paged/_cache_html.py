"""HTML for ``PagedKVCache._repr_html_``: the cache's occupancy at a glance in Jupyter.

One square per physical block in id order, coloured by the sequence holding it and filled from
the bottom in proportion to the tokens it holds (a partial last block is partly filled); free
blocks are grey, blocks shared by several sequences (after ``fork``) get a black outline. A
legend lists every sequence with its length and blocks. Reads only the cache's public
accessors; pure string building, no imports beyond the standard library.
"""

import html

# matplotlib's tab10 without its grey (kept for free blocks), so a notebook can colour
# sequence s with plt.cm.tab10 minus index 7, i.e. PALETTE[s % 9], and match this view.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#bcbd22", "#17becf")
FREE = "#d9d9d9"
EMPTY = "#f4f4f4"        # the unfilled part of a block
MAX_CELLS = 4096         # larger caches show their first MAX_CELLS blocks (the page stays small)
MAX_LEGEND = 64          # sequences listed one per row; the rest are counted
MAX_IDS = 24             # block ids listed per sequence


def color(sid):
    """The colour of sequence ``sid`` (a CSS hex string)."""
    return PALETTE[sid % len(PALETTE)]


def render(cache):
    """The HTML string for ``cache`` (a PagedKVCache)."""
    bs, nb = cache.block_size, cache.num_blocks
    owners = [[] for _ in range(nb)]            # block -> [(sid, tokens it holds there)]
    for sid in cache.sequences:
        length = cache.length(sid)
        for i, block in enumerate(cache.blocks_of(sid)):
            owners[block].append((sid, min(bs, length - i * bs)))
    used = sum(1 for o in owners if o)
    shared = sum(1 for o in owners if len(o) > 1)
    stored = sum(max(c for _, c in o) for o in owners if o)   # a shared token counts once
    filled = f" ({100 * stored / (used * bs):.0f}% of their slots)" if used else ""

    columns = min(nb, 32)
    cells = []
    for block, held in enumerate(owners[:MAX_CELLS]):
        if block and block % columns == 0:
            cells.append("<br>")
        if not held:
            style, title = f"background-color:{FREE}", f"block {block}: free"
        else:
            sid = held[0][0]
            pct = 100 * max(c for _, c in held) / bs
            # solid colour first: a sanitiser that drops gradients still shows the owner
            style = (f"background-color:{color(sid)};background-image:linear-gradient("
                     f"to top,{color(sid)} {pct:.0f}%,{EMPTY} {pct:.0f}%)")
            who = ", ".join(f"sequence {s}" for s, _ in held)
            title = f"block {block}: {who}, {max(c for _, c in held)}/{bs} tokens"
            if len(held) > 1:
                style += ";outline:2px solid #000;outline-offset:-2px"
                title += " (shared)"
        cells.append(f'<span title="{title}" style="display:inline-block;width:12px;'
                     f'height:12px;margin:1px;{style}"></span>')
    more = (f"<div>first {MAX_CELLS} of {nb} blocks shown</div>" if nb > MAX_CELLS else "")

    rows = []
    for sid in cache.sequences[:MAX_LEGEND]:
        ids = cache.blocks_of(sid)
        shown = ", ".join(map(str, ids[:MAX_IDS])) + (", ..." if len(ids) > MAX_IDS else "")
        rows.append(
            f'<tr><td><span style="display:inline-block;width:10px;height:10px;'
            f'background-color:{color(sid)}"></span> sequence {sid}</td>'
            f"<td>{cache.length(sid)} tokens</td><td>{len(ids)} blocks</td>"
            f"<td>[{shown}]</td></tr>")
    hidden = len(cache.sequences) - MAX_LEGEND
    if hidden > 0:
        rows.append(f'<tr><td colspan="4">... and {hidden} more sequences</td></tr>')

    layout = (f"latent layout (key cache only, v_head_size={cache.v_head_size}), "
              if cache.latent else "")
    head = (f"<b>PagedKVCache</b> {nb} blocks x {bs} tokens, kv_num_heads={cache.kv_num_heads}, "
            f"head_size={cache.head_size}, {layout}{html.escape(str(cache.dtype))}, "
            f"{html.escape(cache.xp.__name__)}")
    counts = (f"blocks: {used} used, {cache.num_free_blocks} free, {shared} shared; "
              f"{len(cache.sequences)} sequences; {stored} tokens stored{filled}")
    return (
        '<div style="font-family:monospace;font-size:12px">'
        f"<div>{head}</div><div>{counts}</div>"
        f'<div style="margin:6px 0;line-height:0">{"".join(cells)}</div>{more}'
        f'<div style="color:#555">block ids run left to right, {columns} per row; grey = free, '
        "fill height = tokens held, black outline = shared</div>"
        f'<table style="font-size:12px;margin-top:4px">{"".join(rows)}</table></div>')
