"""From measurements to findings: the rules, their codes, the gain fit, init audit, activation health."""
