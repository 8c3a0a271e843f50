"""Model families, one file each; module names equal the original checkpoint keys."""
