"""CSV imports of existing people into static lists, in the background, with a report."""
