"""``make faults``: fault and abuse scenarios against the real processes of the embedded stack."""
