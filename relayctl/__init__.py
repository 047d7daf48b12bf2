"""relayctl -- the control client of relayd (see relayctl.__main__)."""
