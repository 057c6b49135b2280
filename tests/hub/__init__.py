"""Tests of timm_fmd.hub and of the local Hub server they run against."""
