"""The reference AIIDA device: a simulated household meter served over gRPC.

It registers at the marketplace, answers search queries from its local profile
(`matcher`), and streams simulated readings (`meter`) to an eligible party's sink
for every data access the marketplace configures (`streamer`). `--fleet N` hosts
N such instances behind one port (`fleet`).
"""

from aiida_stub.config import Config
from aiida_stub.profile import Profile, ProfileError, Source, load_profile, load_profiles

__all__ = ["Config", "Profile", "ProfileError", "Source", "load_profile", "load_profiles"]
