"""Writes a 704x384 portrait cut from the sample (argv[1], default /tmp/portrait.png): with it, hd
is exactly 704*384 and the 384*256 area exactly 384*256, the sizes the server warms up (the
square sample gives 512*512 and 256*256)."""

import sys
from pathlib import Path

from PIL import Image

im = Image.open(Path(__file__).resolve().parent.parent / "assets" / "astronaut.png")
w, h = im.size
ch = w * 384 // 704
out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/portrait.png"
im.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch)).resize((704, 384)).save(out)
