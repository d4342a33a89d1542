"""What to do about the findings: recommendations, in-memory fixes, their verification, the optimisation probe."""
