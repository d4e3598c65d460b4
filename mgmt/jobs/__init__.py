"""Jobs: deploy, start, stop, destroy and migrate as persistent jobs advanced by answers."""
