"""The data layer: WebDataset shards from a metadata table (:mod:`~fastmask.data.shards`, read by
:mod:`~fastmask.data.tar`), the streaming loader (:mod:`~fastmask.data.loader`, with :mod:`~fastmask.data.stats`),
a map-style dataset over an image table (:mod:`~fastmask.data.image_table`), the papers' transforms
(:mod:`~fastmask.data.transforms`), group balancing and the multi-attribute reduction
(:mod:`~fastmask.data.balance`), stratified splits (:mod:`~fastmask.data.splits`) and the batch contract
(:mod:`~fastmask.data.batch`). It imports nothing of fastmask but :mod:`fastmask.util`."""
