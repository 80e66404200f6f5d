"""Measured comparisons: each module runs ours and an alternative in the same process and prints ratios."""
