"""The frozen report (the one value every renderer reads) and its sections."""
